"""TPU attention with JAX's splash attention kernel (`jax.experimental.pallas.ops.tpu`), as
MaxText runs it: a static causal mask by index, segment ids for documents, grouped-query heads
natively, the fused backward kernel. Off TPU the kernel runs in Pallas interpret mode (numerics
tests on CPU).

Under context parallelism the rows are in the load-balanced order: each device holds its query
chunks and all keys; the keys are put back in natural order and the mask's query sequence is the
load-balanced permutation, so causality by index is still causality by position.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec

from llama3_jax.config import ModelConfig
from llama3_jax.model.masks import AttentionMask, load_balanced_order

LANES = 128  # the kernel's tiles are multiples of this many tokens


class _PermutedCausalMask(masks.CausalMask):
  """Causal by index, the queries being the tokens `q_sequence` (a permutation) of the keys."""

  def __init__(self, q_sequence: np.ndarray):
    super().__init__((len(q_sequence), len(q_sequence)))
    self.q_sequence = np.asarray(q_sequence, np.int32)


def supports(cfg: ModelConfig, q_len: int, kv_len: int, mask: AttentionMask) -> bool:
  """Self-attention rows in a known index order (no cache, no branch ids) whose per-device
  query length divides into whole 128-token tiles."""
  order = mask.index_order
  return (
    order is not None
    and q_len == kv_len
    and q_len % (2 * order * LANES if order > 1 else LANES) == 0
  )


def _block(requested: int, length: int) -> int:
  """The largest multiple of 128 <= `requested` that divides `length` (a multiple of 128)."""
  block = max(LANES, min(requested, length) // LANES * LANES)
  while length % block:
    block -= LANES
  return block


def prepare(cfg: ModelConfig, q_shape, mask: AttentionMask, interpret: bool, specs):
  """(the splash kernel for these global shapes, its shard_map PartitionSpecs or None);
  `interpret`: run it in Pallas interpret mode (off TPU)."""
  _, length, n_heads, _ = q_shape
  order = mask.index_order
  mesh = jax.sharding.get_abstract_mesh()
  degree = lambda name: (
    1
    if specs is None or specs[name] is None
    else int(np.prod([mesh.shape[a] for a in np.atleast_1d(specs[name])]))
  )
  head_shards, q_shards = degree("act_heads"), degree("length")
  q_sequence = load_balanced_order(length, order) if order > 1 else np.arange(length)
  causal = _PermutedCausalMask(q_sequence)
  block_q = _block(cfg.attention_block_q, length // q_shards)
  block_kv = _block(cfg.attention_block_kv, length)
  sizes = kernels.BlockSizes(
    block_q=block_q,
    block_kv=block_kv,
    block_kv_compute=block_kv,
    block_q_dkv=block_q,
    block_kv_dkv=block_kv,
    block_kv_dkv_compute=block_kv,
    use_fused_bwd_kernel=True,
  )
  kernel = kernels.make_splash_mha(
    masks.MultiHeadMask((causal,) * n_heads),
    block_sizes=sizes,
    head_shards=head_shards,
    q_seq_shards=q_shards,
    interpret=interpret,
  )
  if specs is None:
    return kernel, None
  sharding = NamedSharding(mesh, PartitionSpec(specs["act_heads"], specs["length"]))
  return kernel, kernel.manual_sharding_spec(sharding)


def local_attention(q_BTHK, k_BSGK, v_BSGK, mask: AttentionMask, kernel):
  """One device's [B, T, H, K] output: its queries over all keys and values [B, S, G, K]."""
  order = mask.index_order
  kv_seg = mask.kv_segment_ids
  if order > 1:
    natural = np.argsort(load_balanced_order(k_BSGK.shape[1], order))
    k_BSGK, v_BSGK, kv_seg = (jnp.take(x, natural, axis=1) for x in (k_BSGK, v_BSGK, kv_seg))
  scale = q_BTHK.shape[-1] ** -0.5
  q_BHTK = jnp.einsum("bthk->bhtk", q_BTHK * jnp.asarray(scale, q_BTHK.dtype))
  k_BGSK, v_BGSK = (jnp.einsum("bsgk->bgsk", x) for x in (k_BSGK, v_BSGK))
  per_row = lambda q, k, v, q_seg, kv_seg: kernel(q, k, v, kernels.SegmentIds(q_seg, kv_seg))
  out_BHTK = jax.vmap(per_row)(q_BHTK, k_BGSK, v_BGSK, mask.q_segment_ids, kv_seg)
  out_BTHK = jnp.einsum("bhtk->bthk", out_BHTK)
  return jnp.where((mask.q_segment_ids != 0)[:, :, None, None], out_BTHK, 0).astype(q_BTHK.dtype)
