"""Block-wise ("flash") attention in pure JAX: O(T) memory, any backend.

Queries are cut into blocks of `block_q` tokens and keys into blocks of `block_kv`; each query
block runs an online softmax over the key blocks, so at most one [block_q, block_kv] score tile
per head is alive. The mask of a tile is computed from the tokens' positions, segment ids and
branch ids (masks.py); a tile that no query of the block can see (keys after every query, or
other documents only) is skipped by a conditional, costing no matmul where the backend runs
conditionals (not under `vmap`, where both branches run). Grouped-query attention groups the
query heads by key/value head; K and V are never repeated. The custom VJP keeps only the output
and the per-query log-sum-exp and recomputes each tile's scores in the backward pass (one pass
over the tiles for dq, dk and dv together, as FlashAttention-2).

Queries that see no key (padding) output zeros.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from llama3_jax.model.masks import AttentionMask, visible

_NEG = -1e30  # a score no real score reaches; finite so that exp(_NEG - _NEG) is 1, not NaN
_INT_MAX = jnp.iinfo(jnp.int32).max


class _Tokens(NamedTuple):
  """Per-token mask inputs of one side (queries or keys), [n_blocks, B, block] int32 each."""

  positions: jnp.ndarray
  segment_ids: jnp.ndarray
  branch_ids: Optional[jnp.ndarray]


def flash_attention(q_BTHK, k_BSGK, v_BSGK, mask: AttentionMask, block_q: int, block_kv: int):
  """[B, T, H, K] attention output of queries [B, T, H, K] over keys and values [B, S, G, K]
  (H = G x queries per kv head), softmax in float32, matmuls in the inputs' dtype."""
  batch, length, n_heads, head_dim = q_BTHK.shape
  kv_length, n_kv_heads = k_BSGK.shape[1], k_BSGK.shape[2]
  block_q, block_kv = min(block_q, length), min(block_kv, kv_length)
  q = _blocks(q_BTHK.reshape(batch, length, n_kv_heads, -1, head_dim), block_q)
  k, v = (_blocks(x, block_kv) for x in (k_BSGK, v_BSGK))
  q_tokens = _Tokens(*(None if x is None else _blocks(x, block_q) for x in mask.queries))
  kv_tokens = _Tokens(*(None if x is None else _blocks(x, block_kv) for x in mask.keys))
  # Tie the mask inputs to the queries: inside a differentiated scan over layers, JAX would
  # otherwise hoist every tile's mask (it depends on loop-invariant inputs only) out of the
  # loop, materialising all [block_q, block_kv] tiles at once.
  q, q_tokens, kv_tokens = jax.lax.optimization_barrier((q, q_tokens, kv_tokens))
  out = _flash(q, k, v, q_tokens, kv_tokens, head_dim**-0.5)  # [nq, B, bq, G, R, K]
  out = jnp.moveaxis(out, 0, 1).reshape(batch, -1, n_heads, head_dim)
  return out[:, :length]


def _blocks(x, block: int):
  """[B, N, ...] -> [ceil(N / block), B, block, ...], zero-padded (padding is segment 0)."""
  n = x.shape[1]
  padded = -(-n // block) * block
  x = jnp.pad(x, [(0, 0), (0, padded - n)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((x.shape[0], padded // block, block) + x.shape[2:]), 1, 0)


def _tile_mask(q_tokens: _Tokens, kv_tokens: _Tokens):
  """bool [B, 1, 1, bq, bk] for one query block and one key block (broadcast over heads)."""
  return visible(*q_tokens, *kv_tokens)[:, None, None]


def _visible_tiles(q_tokens: _Tokens, kv_tokens: _Tokens):
  """bool [nq, nk]: False where no query of block i can see a key of block j in any row (every
  key after every query, disjoint segment ranges, or all padding). A cheap superset test."""
  q_real, kv_real = q_tokens.segment_ids != 0, kv_tokens.segment_ids != 0
  q_last = jnp.max(jnp.where(q_real, q_tokens.positions, -1), axis=2)  # [nq, B]
  kv_first = jnp.min(jnp.where(kv_real, kv_tokens.positions, _INT_MAX), axis=2)  # [nk, B]
  q_lo = jnp.min(jnp.where(q_real, q_tokens.segment_ids, _INT_MAX), axis=2)
  q_hi = jnp.max(q_tokens.segment_ids, axis=2)
  kv_lo = jnp.min(jnp.where(kv_real, kv_tokens.segment_ids, _INT_MAX), axis=2)
  kv_hi = jnp.max(kv_tokens.segment_ids, axis=2)
  possible = (
    (kv_first[None] <= q_last[:, None])
    & (q_lo[:, None] <= kv_hi[None])
    & (kv_lo[None] <= q_hi[:, None])
  )
  return jnp.any(possible, axis=2)


def _scores(q_BqGRK, k_BkGK, scale):
  return (
    jnp.einsum("bqgrk,bsgk->bgrqs", q_BqGRK, k_BkGK, preferred_element_type=jnp.float32) * scale
  )


def _forward(q, k, v, q_tokens, kv_tokens, scale):
  """(out [nq, B, bq, G, R, K] in q's dtype, log-sum-exp [nq, B, G, R, bq] float32)."""
  tiles = _visible_tiles(q_tokens, kv_tokens)

  def query_block(args):
    q_i, q_tok, tiles_i = args
    batch, block_q, groups, per_group, head_dim = q_i.shape
    stats = jnp.full((batch, groups, per_group, block_q), _NEG, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros(stats.shape + (head_dim,), jnp.float32))

    def key_block(carry, args):
      k_j, v_j, kv_tok, seen = args

      def update(carry):
        m, l, acc = carry
        mask = _tile_mask(q_tok, kv_tok)
        s = jnp.where(mask, _scores(q_i, k_j, scale), _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum(
          "bgrqs,bsgk->bgrqk", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
        )
        return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

      return jax.lax.cond(seen, update, lambda c: c, carry), None

    (m, l, acc), _ = jax.lax.scan(key_block, init, (k, v, kv_tokens, tiles_i))
    out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), jnp.inf)
    return jnp.einsum("bgrqk->bqgrk", out).astype(q_i.dtype), lse

  return jax.lax.map(query_block, (q, q_tokens, tiles))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_tokens, kv_tokens, scale):
  return _forward(q, k, v, q_tokens, kv_tokens, scale)[0]


def _flash_fwd(q, k, v, q_tokens, kv_tokens, scale):
  out, lse = _forward(q, k, v, q_tokens, kv_tokens, scale)
  return out, (q, k, v, q_tokens, kv_tokens, out, lse)


def _flash_bwd(scale, residuals, d_out):
  """Gradients of q, k, v: one pass over the tiles, key blocks outside, query blocks inside; dq
  is accumulated for every query block, dk and dv for the current key block."""
  q, k, v, q_tokens, kv_tokens, out, lse = residuals
  tiles = _visible_tiles(q_tokens, kv_tokens)
  # delta = rowsum(dO * O), the softmax-gradient correction per query and head: [nq, B, G, R, bq]
  delta = jnp.einsum("nbqgrk,nbqgrk->nbgrq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def key_block(dq, args):
    k_j, v_j, kv_tok, tiles_j = args

    def query_block(carry, args):
      dk_j, dv_j, dq = carry
      i, q_i, do_i, lse_i, delta_i, q_tok, seen = args

      def tile_grads(_):
        mask = _tile_mask(q_tok, kv_tok)
        p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None]), 0.0)
        dv = jnp.einsum(
          "bgrqs,bqgrk->bsgk", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bqgrk,bsgk->bgrqs", do_i, v_j, preferred_element_type=jnp.float32)
        # The score gradient stays float32 (unlike FlashAttention's bf16): bf16 dq and dk then
        # err no more than the einsum reference's.
        ds = p * (dp - delta_i[..., None]) * scale
        dq = jnp.einsum("bgrqs,bsgk->bqgrk", ds, k_j.astype(jnp.float32))
        dk = jnp.einsum("bgrqs,bqgrk->bsgk", ds, q_i.astype(jnp.float32))
        return dq, dk, dv

      def nothing(_):
        return (
          jnp.zeros(q_i.shape, jnp.float32),
          jnp.zeros(k_j.shape, jnp.float32),
          jnp.zeros(v_j.shape, jnp.float32),
        )

      dq_i, dk, dv = jax.lax.cond(seen, tile_grads, nothing, None)
      dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
      return (dk_j + dk, dv_j + dv, dq), None

    zeros_kv = jnp.zeros(k_j.shape, jnp.float32)
    xs = (jnp.arange(q.shape[0]), q, d_out, lse, delta, q_tokens, tiles_j)
    (dk_j, dv_j, dq), _ = jax.lax.scan(query_block, (zeros_kv, zeros_kv, dq), xs)
    return dq, (dk_j, dv_j)

  dq0 = jnp.zeros(q.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(key_block, dq0, (k, v, kv_tokens, tiles.T))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
