"""Building blocks: RMSNorm, the SwiGLU feed-forward and parameter declaration with logical axes."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig

WEIGHT_INIT = nn.initializers.normal(stddev=0.02)


def declare(
  module: nn.Module,
  name: str,
  shape: Sequence[int],
  axes: Sequence[str],
  cfg: ModelConfig,
  cast: bool = True,
) -> jnp.ndarray:
  """A parameter of `shape` annotated with logical `axes`, cast to the compute dtype if `cast`."""
  value = module.param(
    name,
    nn.with_logical_partitioning(WEIGHT_INIT, tuple(axes)),
    tuple(shape),
    jnp.dtype(cfg.param_dtype),
  )
  return jnp.asarray(value, jnp.dtype(cfg.dtype)) if cast else value


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis, computed in float32 and cast back."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      (x.shape[-1],),
      jnp.dtype(self.cfg.param_dtype),
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed.astype(x.dtype) * scale.astype(x.dtype)).astype(jnp.dtype(self.cfg.dtype))


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x); [B, T, D] -> [B, T, D]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    w1 = declare(self, "w1", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), cfg)
    w3 = declare(self, "w3", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), cfg)
    w2 = declare(self, "w2", (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), cfg)
    gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w1)
    up_BTF = jnp.einsum("btd,df->btf", x_BTD, w3)
    hidden_BTF = nn.with_logical_constraint(
      nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp")
    )
    return jnp.einsum("btf,fd->btd", hidden_BTF, w2)
