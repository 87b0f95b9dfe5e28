"""Shardings of parameters and batches from the logical rules, and parameters created already sharded."""

import contextlib
from typing import Dict

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama3_jax.config import ModelConfig
from llama3_jax.model import param_shapes
from llama3_jax.model.params import init_boxed
from llama3_jax.parallel.rules import LOGICAL_AXIS_RULES, check_divisibility


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
  """Trace and run under `mesh` with the logical rules active, so the model's activation
  constraints (`nn.with_logical_constraint`) take effect. On a one-device mesh there is nothing to
  place and the rules stay off: the constraints would only keep XLA from fusing across them."""
  rules = LOGICAL_AXIS_RULES if mesh.size > 1 else ()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves carry logical axes (e.g. `param_shapes`, optimizer state)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_AXIS_RULES)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Dict:
  """NamedSharding of every parameter, after checking that the mesh divides every sharded shape."""
  check_divisibility(cfg, mesh)
  return logical_shardings(param_shapes(cfg), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, L] input rows split over the batch axes, whole along L (the step splits the sequence)."""
  spec = nn.logical_to_mesh_axes(("batch", None), LOGICAL_AXIS_RULES)
  return NamedSharding(mesh, PartitionSpec(*spec))


def init_sharded_params(cfg: ModelConfig, mesh: Mesh, rng: jax.Array) -> Dict:
  """Random parameters created directly in their shards: no device ever holds the whole model."""
  shardings = param_shardings(cfg, mesh)
  init = jax.jit(lambda r: nn.unbox(init_boxed(cfg, r)), out_shardings=shardings)
  with mesh_context(mesh):
    return init(rng)


def shard_params(params: Dict, cfg: ModelConfig, mesh: Mesh) -> Dict:
  """Places host (e.g. converted checkpoint) parameters onto the mesh, leaf by leaf."""
  return jax.tree.map(jax.device_put, params, param_shardings(cfg, mesh))
