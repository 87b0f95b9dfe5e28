"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

import jax
import jax.numpy as jnp

from llama3_jax.config import SamplingConfig


def _filter_sorted(sorted_BV: jnp.ndarray, cfg: SamplingConfig) -> jnp.ndarray:
  """Descending logits with ranks outside top-k, then outside the top-p mass of what is left, at -inf.

  Cuts are by rank, so tied logits at the boundary are not all kept.
  """
  if cfg.top_k:
    sorted_BV = jnp.where(jnp.arange(sorted_BV.shape[-1]) < cfg.top_k, sorted_BV, -jnp.inf)
  if cfg.top_p < 1.0:
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    sorted_BV = jnp.where(mass_before_BV < cfg.top_p, sorted_BV, -jnp.inf)
  return sorted_BV


def sample(logits_BV: jnp.ndarray, rng: jax.Array, cfg: SamplingConfig) -> jnp.ndarray:
  """[B, V] logits -> [B] int32 token ids."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  if not cfg.top_k and cfg.top_p == 1.0:
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
  order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
  sorted_BV = _filter_sorted(jnp.take_along_axis(logits_BV, order_BV, axis=-1), cfg)
  rank_B = jax.random.categorical(rng, sorted_BV, axis=-1)
  return jnp.take_along_axis(order_BV, rank_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
