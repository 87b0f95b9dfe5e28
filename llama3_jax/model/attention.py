"""Grouped-query attention with RoPE and the causal + document mask."""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model.layers import declare
from llama3_jax.model.rope import apply_rope, inverse_frequencies


def attention_mask(
  q_positions_BT, q_segment_ids_BT, kv_positions_BS, kv_segment_ids_BS
) -> jnp.ndarray:
  """[B, T, S] bool: a query sees keys of its own non-padding segment at positions <= its own."""
  same_segment = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  causal = kv_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
  return same_segment & causal & (kv_segment_ids_BS[:, None, :] != 0)


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
  out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
  return out_BTGRK.reshape(batch, length, n_heads, head_dim)


def fused_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> jnp.ndarray:
  """`jax.nn.dot_product_attention` with JAX's choice of implementation (XLA as of jax 0.10)."""
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_BTS[:, None])


ATTENTION_FNS = {"xla": xla_attention, "dot_product": fused_attention}


class Attention(nn.Module):
  """Self-attention over the current tokens, or over the cache slots of this layer when given one."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    x_BTD,
    positions_BT,
    mask_BTS,
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
    q = apply_rope(jnp.einsum("btd,dhk->bthk", x_BTD, wq), positions_BT, inv_freq)
    k = apply_rope(jnp.einsum("btd,dgk->btgk", x_BTD, wk), positions_BT, inv_freq)
    v = jnp.einsum("btd,dgk->btgk", x_BTD, wv)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "kv_length", "act_kv_heads", "act_head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "kv_length", "act_kv_heads", "act_head_dim"))

    if cache_kv is not None:
      start = (layer_index, 0, cache_index, 0, 0)
      cache_kv = tuple(
        jax.lax.dynamic_update_slice(whole, new[None].astype(whole.dtype), start)
        for whole, new in zip(cache_kv, (k, v))
      )
      k, v = (
        jax.lax.dynamic_index_in_dim(whole, layer_index, keepdims=False) for whole in cache_kv
      )

    out_BTHK = ATTENTION_FNS[cfg.attention_impl](q, k, v, mask_BTS)
    return jnp.einsum("bthk,hkd->btd", out_BTHK, wo), cache_kv
