"""Parameter creation and inspection from a config, without materialising what is not needed."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model.transformer import Transformer

ModuleFn = Callable[[ModelConfig], nn.Module]


def init_boxed(cfg: ModelConfig, rng: jax.Array, module: ModuleFn = Transformer):
  """Parameters of `module(cfg)` (the language model by default) wrapped in
  `nn.LogicallyPartitioned` (their logical axes), not yet unboxed."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return module(cfg).init(rng, tokens)["params"]


_init_boxed_jit = jax.jit(init_boxed, static_argnums=0)


def param_shapes(cfg: ModelConfig, module: ModuleFn = Transformer):
  """Pytree of `jax.ShapeDtypeStruct` wrapped in `nn.LogicallyPartitioned` (logical axes kept)
  of `module(cfg)`'s parameters (the language model's by default)."""
  return jax.eval_shape(lambda rng: init_boxed(cfg, rng, module), jax.random.key(0))


def count_params(cfg: ModelConfig) -> int:
  """Total number of parameters, from shapes alone."""
  return sum(x.size for x in jax.tree.leaves(nn.unbox(param_shapes(cfg))))


def init_params(cfg: ModelConfig, rng: jax.Array):
  """Random parameters (normal std 0.02, norms at 1) as a plain pytree of arrays."""
  return nn.unbox(_init_boxed_jit(cfg, rng))
