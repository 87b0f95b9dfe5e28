"""Who attends to whom, described per token: positions, segment ids and branch ids of the queries
and of the keys. Attention implementations build the mask from these tile by tile (flash) or
whole (xla); nothing outside `dense` ever holds a [B, T, S] mask.

A query sees a key when both are in the same non-padding segment (segment id 0 is padding, never
seen) and the key's position is <= the query's. With branch ids, a token of branch b > 0 sees
branch 0 (the shared start of the document) and its own branch only.
"""

from typing import Optional

import flax.linen as nn
import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class AttentionMask:
  """q_positions, q_segment_ids [B, T] int32; kv_positions, kv_segment_ids [B, S] int32;
  q_branch_ids [B, T] and kv_branch_ids [B, S] int32 or both None."""

  q_positions: jnp.ndarray
  q_segment_ids: jnp.ndarray
  kv_positions: jnp.ndarray
  kv_segment_ids: jnp.ndarray
  q_branch_ids: Optional[jnp.ndarray] = None
  kv_branch_ids: Optional[jnp.ndarray] = None
  # Self-attention rows whose positions increase with the index within each segment, in the
  # load-balanced order of this context degree (1: natural order; parallel/context.py): then
  # causality by position is causality by index, which the index-masked kernels (splash,
  # gpu_flash) need. None: anything else (keys in a cache, branches).
  index_order: Optional[int] = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def self_attention(
    cls, positions_BT, segment_ids_BT, branch_ids_BT=None, index_order=None
  ) -> "AttentionMask":
    """Tokens attending to each other (no cache): causal by position within each document."""
    q = _constrain((positions_BT, segment_ids_BT, branch_ids_BT), "length")
    kv = _constrain((positions_BT, segment_ids_BT, branch_ids_BT), "kv_length")
    order = None if branch_ids_BT is not None else index_order
    return cls(q[0], q[1], kv[0], kv[1], q[2], kv[2], index_order=order)

  @classmethod
  def over_cache(cls, positions_BT, segment_ids_BT, kv_positions_BS, kv_segment_ids_BS):
    """New tokens attending to the cache slots (which already hold them)."""
    return cls(positions_BT, segment_ids_BT, kv_positions_BS, kv_segment_ids_BS)

  def dense(self) -> jnp.ndarray:
    """bool [B, T, S]: True where query t sees key s."""
    return visible(*self.queries, *self.keys)

  @property
  def queries(self):
    """(positions, segment ids, branch ids or None) of the queries, each [B, T]."""
    return self.q_positions, self.q_segment_ids, self.q_branch_ids

  @property
  def keys(self):
    """(positions, segment ids, branch ids or None) of the keys, each [B, S]."""
    return self.kv_positions, self.kv_segment_ids, self.kv_branch_ids

  @property
  def has_branches(self) -> bool:
    return self.q_branch_ids is not None


def visible(q_pos_BT, q_seg_BT, q_branch_BT, kv_pos_BS, kv_seg_BS, kv_branch_BS) -> jnp.ndarray:
  """bool [B, T, S]: which of these keys each of these queries sees (branch ids may be None)."""
  seen = (
    (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])
    & (kv_seg_BS[:, None, :] != 0)
    & (kv_pos_BS[:, None, :] <= q_pos_BT[:, :, None])
  )
  if q_branch_BT is not None:
    kv_branch = kv_branch_BS[:, None, :]
    seen &= (kv_branch == 0) | (kv_branch == q_branch_BT[:, :, None])
  return seen


def _constrain(arrays, length_axis: str):
  return tuple(
    None if a is None else nn.with_logical_constraint(a, ("batch", length_axis)) for a in arrays
  )


def load_balanced_order(length: int, degree: int) -> np.ndarray:
  """int [length]: the permutation of 0..length-1 putting chunks r and 2*degree-1-r of 2*degree
  equal chunks into the r-th contiguous block of length / degree (what rank r of `context` holds)."""
  if length % (2 * degree):
    raise ValueError(
      f"Context parallelism of degree {degree} needs a sequence length divisible by "
      f"2 x {degree} = {2 * degree}; got {length}"
    )
  chunks = np.arange(length).reshape(2 * degree, length // (2 * degree))
  return np.concatenate([np.concatenate([chunks[r], chunks[-1 - r]]) for r in range(degree)])
