"""The key/value cache for incremental decoding, a pytree passed in and returned explicitly."""

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from llama3_jax.config import ModelConfig


# k and v: kv heads over `tensor` like the key/value projections that fill them, rows over the
# batch axes, layers over `pipeline` like the layer weights; the slot axis stays whole.
CACHE_KV_AXES = ("layers", "batch", "kv_length", "act_kv_heads", "act_head_dim")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `S` slots per row.

  k, v:        [layers, B, S, kv_heads, head_dim] in the compute dtype.
  positions:   [B, S] int32 RoPE position of the token held in each slot.
  segment_ids: [B, S] int32 segment of that token; 0 marks an empty slot, never attended to.
  index:       [] int32 next slot to write; every row writes at the same slot.

  A call with T tokens needs index + T <= S; the model checks T <= S, and the caller sizes the
  cache for the whole generation (as `generate` does): writes past the end are clamped by XLA.
  """

  k: jnp.ndarray
  v: jnp.ndarray
  positions: jnp.ndarray
  segment_ids: jnp.ndarray
  index: jnp.ndarray

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
    return cls(
      k=jnp.zeros(shape, jnp.dtype(cfg.dtype)),
      v=jnp.zeros(shape, jnp.dtype(cfg.dtype)),
      positions=jnp.zeros((batch, slots), jnp.int32),
      segment_ids=jnp.zeros((batch, slots), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )

  def constrained(self) -> "KVCache":
    """The cache with k and v placed by CACHE_KV_AXES under the active logical rules (a no-op
    without them)."""
    k, v = (nn.with_logical_constraint(x, CACHE_KV_AXES) for x in (self.k, self.v))
    return self.replace(k=k, v=v)

  @property
  def slots(self) -> int:
    return self.positions.shape[1]
