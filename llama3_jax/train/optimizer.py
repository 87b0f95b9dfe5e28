"""The Optax optimizer: global-norm clipping then AdamW under the Llama 3 learning-rate schedule."""

import jax
import jax.numpy as jnp
import optax

from llama3_jax.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """step -> learning rate: linear warm-up, cosine to the floor, optional final linear anneal to 0."""
  floor = cfg.peak_lr * cfg.floor_ratio
  anneal_start = total_steps - cfg.anneal_steps

  def warmup_cosine(step):
    step = jnp.asarray(step, jnp.float32)
    warm = cfg.peak_lr * step / max(cfg.warmup_steps, 1)
    progress = jnp.clip((step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps), 0.0, 1.0)
    cosine = floor + (cfg.peak_lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < cfg.warmup_steps, warm, cosine)

  def schedule(step):
    lr = warmup_cosine(step)
    if not cfg.anneal_steps:
      return lr
    remaining = (total_steps - jnp.asarray(step, jnp.float32)) / cfg.anneal_steps
    return jnp.where(
      step >= anneal_start, warmup_cosine(anneal_start) * jnp.maximum(remaining, 0.0), lr
    )

  return schedule


def _decay_mask(kind: str):
  if kind == "all":
    return None
  return lambda params: jax.tree.map(lambda p: kind == "matrices" and p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(
    learning_rate_schedule(cfg, total_steps),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=_decay_mask(cfg.weight_decay_mask),
  )
  if not cfg.clip_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
