"""The training state pytree and its creation directly in shards on a mesh."""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.model.params import init_boxed
from llama3_jax.parallel import check_divisibility, logical_shardings, mesh_context


@flax.struct.dataclass
class TrainState:
  """step: [] int32 updates applied; nonfinite_streak / nonfinite_total: [] int32 skipped steps."""

  step: jnp.ndarray
  params: Any
  opt_state: Any
  nonfinite_streak: jnp.ndarray
  nonfinite_total: jnp.ndarray

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    zero = jnp.zeros((), jnp.int32)
    return cls(
      step=zero,
      params=params,
      opt_state=tx.init(params),
      nonfinite_streak=zero,
      nonfinite_total=zero,
    )


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
  """NamedShardings of every TrainState leaf: optimizer moments follow their parameters."""
  check_divisibility(cfg, mesh)
  boxed = jax.eval_shape(lambda r: TrainState.create(init_boxed(cfg, r), tx), jax.random.key(0))
  return logical_shardings(boxed, mesh)


def abstract_train_state(
  cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """ShapeDtypeStructs of the state, each with its sharding on `mesh`: a restore target."""
  shapes = jax.eval_shape(
    lambda r: TrainState.create(nn.unbox(init_boxed(cfg, r)), tx), jax.random.key(0)
  )
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    state_shardings(cfg, tx, mesh),
  )


def create_train_state(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rng: jax.Array,
  params: Optional[Dict] = None,
) -> Tuple[TrainState, Any]:
  """(state, its shardings), built inside jit with sharded outputs: from random init, or from
  `params` (e.g. a converted checkpoint, on the host) placed leaf by leaf onto the mesh."""
  shardings = state_shardings(cfg, tx, mesh)
  with mesh_context(mesh):
    if params is None:
      state = jax.jit(
        lambda r: TrainState.create(nn.unbox(init_boxed(cfg, r)), tx), out_shardings=shardings
      )(rng)
    else:
      params = jax.tree.map(jax.device_put, params, shardings.params)
      state = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=shardings)(params)
  return state, shardings
