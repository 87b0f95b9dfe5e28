"""Building blocks: RMSNorm, the SwiGLU feed-forward (plain and fp8) and parameter declaration
with logical axes."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model import fp8

WEIGHT_STDDEV = 0.02
WEIGHT_INIT = nn.initializers.normal(stddev=WEIGHT_STDDEV)
# Random fp8 weights: e4m3 values of a standard normal times FP8_INIT_GAIN (4 standard
# deviations reach 448) with a constant scale, so that values * scale ~ normal(WEIGHT_STDDEV).
FP8_INIT_GAIN = fp8.E4M3_MAX / 4


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


def project(spec: str, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """`einsum(spec, x, w)` accumulated in float32 and cast back to `x`'s dtype. (XLA:CPU also takes
  its fast GEMM path for bf16 inputs only with a float32 result, ~4x faster than a bf16 one.)"""
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# name, shape and logical axes of the three feed-forward weights, as [in, out].
def _ffn_weights(cfg: ModelConfig):
  return (
    ("w1", (cfg.dim, cfg.ffn_dim), ("embed", "mlp")),
    ("w3", (cfg.dim, cfg.ffn_dim), ("embed", "mlp")),
    ("w2", (cfg.ffn_dim, cfg.dim), ("mlp", "embed")),
  )


def _swiglu(x_BTD, matmul):
  """w2(silu(w1 x) * w3 x) with `matmul(name, x)` applying the named weight."""
  hidden_BTF = nn.silu(matmul("w1", x_BTD)) * matmul("w3", x_BTD)
  hidden_BTF = nn.with_logical_constraint(hidden_BTF, ("batch", "length", "act_mlp"))
  return matmul("w2", hidden_BTF)


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x); [B, T, D] -> [B, T, D]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
    weights = {
      name: declare(self, name, shape, axes, self.cfg)
      for name, shape, axes in _ffn_weights(self.cfg)
    }
    return _swiglu(x_BTD, lambda name, x: project("...i,io->...o", x, weights[name]))


def _fp8_values_init(rng, shape):
  return fp8.to_e4m3(jax.random.normal(rng, shape) * FP8_INIT_GAIN)


class FP8FeedForward(nn.Module):
  """The SwiGLU of FeedForward with fp8 weights: `wN` e4m3 values [in, out] and `wN_scale`
  float32 [out] (one per output channel); each input is quantized per token with the config's
  activation bound (model/fp8.py). [B, T, D] -> [B, T, D] in the compute dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    weights = {}
    for name, shape, axes in _ffn_weights(cfg):
      values = self.param(name, nn.with_logical_partitioning(_fp8_values_init, axes), shape)
      scales = self.param(
        f"{name}_scale",
        nn.with_logical_partitioning(
          nn.initializers.constant(WEIGHT_STDDEV / FP8_INIT_GAIN), axes[-1:]
        ),
        shape[-1:],
        jnp.float32,
      )
      weights[name] = (values, scales)

    def matmul(name, x):
      values, scales = weights[name]
      return fp8.fp8_matmul(
        x, values, scales, cfg.fp8_activation_scale_ub, out_dtype=jnp.dtype(cfg.dtype)
      )

    return _swiglu(x_BTD, matmul)
