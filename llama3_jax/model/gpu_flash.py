"""GPU attention with JAX's Pallas-Triton flash attention kernel
(`jax.experimental.pallas.ops.gpu.attention.mha`): causal by index, segment ids for documents,
bf16 inputs with float32 softmax, its own backward kernels. Why this kernel and not cuDNN: cuDNN
(`jax.nn.dot_product_attention(implementation="cudnn")`) takes document masks only as a dense
[B, 1, T, S] mask (O(T^2) memory) or, for packed documents, through private sequence-offset
arguments; the Triton kernel takes segment ids directly and runs in interpret mode on a CPU, so
its numbers are tested here. It needs as many key/value heads as query heads: K and V are
repeated per query group inside the kernel call. Rows must be in natural order (no context
parallelism).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention

from llama3_jax.config import ModelConfig
from llama3_jax.model.masks import AttentionMask


def supports(cfg: ModelConfig, q_len: int, kv_len: int, mask: AttentionMask) -> bool:
  """Self-attention rows in natural order (no cache, branch ids or context parallelism)."""
  context = dict(jax.sharding.get_abstract_mesh().shape).get("context", 1)
  return mask.index_order == 1 and q_len == kv_len and context == 1


def prepare(cfg: ModelConfig, q_shape, mask: AttentionMask, interpret: bool, specs):
  """(the kernel's static settings, no PartitionSpecs: they are not arrays)."""
  length = q_shape[1]
  block = lambda requested: min(requested, 1 << (length - 1).bit_length())
  sizes = triton_attention.BlockSizes(
    block_q=block(cfg.attention_block_q),
    block_k=block(cfg.attention_block_kv),
    block_q_dkv=block(64),
    block_kv_dkv=block(64),
    block_q_dq=block(64),
    block_kv_dq=block(64),
  )
  return (sizes, interpret), None


def local_attention(q_BTHK, k_BSGK, v_BSGK, mask: AttentionMask, settings):
  """One device's [B, T, H, K] output over its rows' keys and values [B, T, G, K]."""
  sizes, interpret = settings
  batch, length, n_heads, head_dim = q_BTHK.shape
  groups = n_heads // k_BSGK.shape[2]
  multiple = max(sizes.block_q, sizes.block_k, sizes.block_q_dkv, sizes.block_kv_dkv)
  padded = -(-length // multiple) * multiple
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
  # Repeated in float32 so that the backward sums each group's gradients in float32.
  k_BTHK, v_BTHK = (
    jnp.repeat(x.astype(jnp.float32), groups, axis=2).astype(x.dtype) for x in (k_BSGK, v_BSGK)
  )
  out = triton_attention.mha(
    pad(q_BTHK),
    pad(k_BTHK),
    pad(v_BTHK),
    pad(mask.q_segment_ids),
    sm_scale=head_dim**-0.5,
    causal=True,
    block_sizes=sizes,
    interpret=interpret,
  )[:, :length]
  return jnp.where((mask.q_segment_ids != 0)[:, :, None, None], out, 0).astype(q_BTHK.dtype)
