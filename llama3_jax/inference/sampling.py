"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


def filtered_logits(logits_BV: jnp.ndarray, cfg: SamplingConfig) -> jnp.ndarray:
  """float32 logits / temperature with tokens outside the top-k / top-p set at -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth_largest = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_largest, -jnp.inf, logits_BV)
  if cfg.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_BV, axis=-1)
    probs_desc = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs_desc, axis=-1) - probs_desc
    # The smallest logit still kept: the set grows until it holds top_p of the mass.
    n_keep = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
  return logits_BV


def sample(logits_BV: jnp.ndarray, rng: jax.Array, cfg: SamplingConfig) -> jnp.ndarray:
  """[B, V] logits -> [B] int32 token ids."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filtered_logits(logits_BV, cfg), axis=-1).astype(jnp.int32)
