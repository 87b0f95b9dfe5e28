"""Grouped-query attention with RoPE, and the attention implementations behind one signature:
(q [B, T, H, K], k and v [B, S, G, K], AttentionMask) -> [B, T, H, K].

`xla` and `dot_product` build the [B, T, S] mask and score every pair; `flash`, `splash` and
`gpu_flash` are block-wise kernels that build the mask per tile and run on each device's shard of
the batch, heads and queries (`shard_map` over the logical axes), with keys and values gathered
over `context`. `auto` picks one per call from the platform and the lengths (`choose_impl`).
"""

import functools
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec

from llama3_jax.config import ModelConfig
from llama3_jax.model import gpu_flash, splash
from llama3_jax.model.flash import flash_attention
from llama3_jax.model.layers import declare, project
from llama3_jax.model.masks import AttentionMask
from llama3_jax.model.rope import apply_rope, inverse_frequencies

# `auto` on CPU: flash from this many (query, key) pairs per row and head on, xla below.
FLASH_MIN_PAIRS = 2048 * 2048
Q_AXES = ("batch", "length", "act_heads", "act_head_dim")
KV_AXES = ("batch", "kv_length", "act_kv_heads", "act_head_dim")


def xla_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> jnp.ndarray:
  """Reference einsum attention, softmax in float32. G = kv heads; H = G * queries per kv head."""
  batch, length, n_heads, head_dim = q_BTHK.shape
  n_kv_heads = k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(batch, length, n_kv_heads, n_heads // n_kv_heads, head_dim)
  scores_BGRTS = (
    jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32)
    * head_dim**-0.5
  )
  scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS, jnp.finfo(jnp.float32).min)
  probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = project("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
  return out_BTGRK.reshape(batch, length, n_heads, head_dim)


def fused_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> jnp.ndarray:
  """`jax.nn.dot_product_attention` with JAX's choice of implementation (XLA as of jax 0.10)."""
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_BTS[:, None])


DENSE_FNS = {"xla": xla_attention, "dot_product": fused_attention}


def target_platform() -> str:
  """The platform of the mesh being traced under (a TPU topology compiled for from a CPU host
  counts as tpu), else JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str, why: str) -> None:
  logging.info("attention_impl=%s: using %s (%s)", requested, chosen, why)


def choose_impl(cfg: ModelConfig, q_len: int, kv_len: int, mask: AttentionMask) -> str:
  """The implementation `cfg.attention_impl` resolves to for these lengths and mask (logged once
  per distinct choice). An index-masked kernel asked for where it does not apply (keys in a
  cache, branch ids, unsupported shapes) falls back to flash."""
  requested, platform = cfg.attention_impl, target_platform()
  kernels = {"splash": splash, "gpu_flash": gpu_flash}
  if requested == "auto":
    preferred = {"tpu": "splash", "gpu": "gpu_flash"}.get(platform)
    if preferred and kernels[preferred].supports(cfg, q_len, kv_len, mask):
      chosen, why = preferred, f"on {platform}"
    elif q_len * kv_len >= FLASH_MIN_PAIRS:
      chosen, why = "flash", f"{q_len} x {kv_len} query-key pairs per head"
    else:
      chosen, why = "xla", f"{q_len} x {kv_len} query-key pairs per head"
  elif requested in kernels and not kernels[requested].supports(cfg, q_len, kv_len, mask):
    chosen, why = "flash", f"{requested} does not apply to this call (see its `supports`)"
  else:
    return requested
  _log_choice(requested, chosen, why)
  return chosen


def attend(q_BTHK, k_BSGK, v_BSGK, mask: AttentionMask, cfg: ModelConfig) -> jnp.ndarray:
  """[B, T, H, K] output of `cfg`'s attention implementation."""
  impl = choose_impl(cfg, q_BTHK.shape[1], k_BSGK.shape[1], mask)
  if impl in DENSE_FNS:
    dense = nn.with_logical_constraint(mask.dense(), ("batch", "length", "kv_length"))
    return DENSE_FNS[impl](q_BTHK, k_BSGK, v_BSGK, dense)
  if impl == "flash":
    kernel = functools.partial(
      flash_attention, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv
    )
    return on_each_shard(lambda q, k, v, m, _: kernel(q, k, v, m), q_BTHK, k_BSGK, v_BSGK, mask)
  module = {"splash": splash, "gpu_flash": gpu_flash}[impl]
  interpret = target_platform() != {"splash": "tpu", "gpu_flash": "gpu"}[impl]
  prepare = functools.partial(module.prepare, cfg, q_BTHK.shape, mask, interpret)
  return on_each_shard(module.local_attention, q_BTHK, k_BSGK, v_BSGK, mask, prepare)


def _shard_specs(q_BTHK, k_BSGK):
  """{logical axis: mesh axes (PartitionSpec entry)} for the axes of q and k under the active
  rules; an axis whose size its mesh axes do not divide stays whole (heads and kv heads together,
  so each shard keeps whole query groups)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  sizes = dict(zip(Q_AXES, q_BTHK.shape)) | dict(zip(KV_AXES, k_BSGK.shape))
  specs = {}
  for name, size in sizes.items():
    (entry,) = nn.logical_to_mesh_axes((name,), rules)
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    specs[name] = entry if size % math.prod(mesh.shape[a] for a in axes) == 0 else None
  if specs["act_heads"] is None or specs["act_kv_heads"] is None:
    specs["act_heads"] = specs["act_kv_heads"] = None
  return specs


def on_each_shard(kernel, q_BTHK, k_BSGK, v_BSGK, mask: AttentionMask, prepare=None):
  """Runs `kernel(q, k, v, mask, extra)` on each device's shard of the batch, query heads and
  queries (all keys: `kv_length` is whole), or directly outside a sharded mesh. `prepare(specs)`
  (optional) gives (extra, its PartitionSpecs) from {logical axis: mesh axes or None}, None
  outside a sharded mesh."""
  specs = _shard_specs(q_BTHK, k_BSGK)
  extra_value, extra_specs = (None, None) if prepare is None else prepare(specs)
  if specs is None:
    return kernel(q_BTHK, k_BSGK, v_BSGK, mask, extra_value)
  q_spec = PartitionSpec(*(specs[a] for a in Q_AXES))
  kv_spec = PartitionSpec(*(specs[a] for a in KV_AXES))
  row_q = PartitionSpec(specs["batch"], specs["length"])
  row_kv = PartitionSpec(specs["batch"], specs["kv_length"])
  mask_specs = mask.replace(
    q_positions=row_q,
    q_segment_ids=row_q,
    kv_positions=row_kv,
    kv_segment_ids=row_kv,
    q_branch_ids=row_q if mask.has_branches else None,
    kv_branch_ids=row_kv if mask.has_branches else None,
  )
  in_specs = (q_spec, kv_spec, kv_spec, mask_specs, extra_specs)
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
    q_BTHK, k_BSGK, v_BSGK, mask, extra_value
  )


def write_in_place(whole, update, start):
  """`lax.dynamic_update_slice(whole, update, start)` on the bits of a 16-bit float array: XLA on
  CPU computes a bfloat16 update in float32, converting (and so rewriting) all of `whole`; on
  unsigned integers of the same width it writes the slice in place."""
  if whole.dtype.itemsize != 2:
    return jax.lax.dynamic_update_slice(whole, update, start)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  written = jax.lax.dynamic_update_slice(bits(whole), bits(update), start)
  return jax.lax.bitcast_convert_type(written, whole.dtype)


class Attention(nn.Module):
  """Self-attention over the current tokens, or over the cache slots of this layer when given one."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    x_BTD,
    positions_BT,
    mask: AttentionMask,
    cache_kv: Optional[Tuple] = None,
    layer_index=None,
    cache_index=None,
  ):
    """Returns ([B, T, D] output, whole-model cache (k, v) with this layer's new keys and values
    written at `cache_index`, or None). Cache k, v: [layers, B, S, kv_heads, head_dim]."""
    cfg = self.cfg
    wq = declare(
      self, "wq", (cfg.dim, cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg
    )
    wk = declare(
      self, "wk", (cfg.dim, cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg
    )
    wv = declare(
      self, "wv", (cfg.dim, cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg
    )
    wo = declare(
      self, "wo", (cfg.n_heads, cfg.head_dim, cfg.dim), ("heads", "head_dim", "embed"), cfg
    )

    inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = apply_rope(project("btd,dhk->bthk", x_BTD, wq), positions_BT, inv_freq)
    k = apply_rope(project("btd,dgk->btgk", x_BTD, wk), positions_BT, inv_freq)
    v = project("btd,dgk->btgk", x_BTD, wv)
    q = nn.with_logical_constraint(q, Q_AXES)
    k = nn.with_logical_constraint(k, KV_AXES)
    v = nn.with_logical_constraint(v, KV_AXES)

    if cache_kv is not None:
      start = (layer_index, 0, cache_index, 0, 0)
      cache_kv = tuple(
        write_in_place(whole, new[None].astype(whole.dtype), start)
        for whole, new in zip(cache_kv, (k, v))
      )
      k, v = (
        jax.lax.dynamic_index_in_dim(whole, layer_index, keepdims=False) for whole in cache_kv
      )

    out_BTHK = nn.with_logical_constraint(attend(q, k, v, mask, cfg), Q_AXES)
    return project("bthk,hkd->btd", out_BTHK, wo), cache_kv
