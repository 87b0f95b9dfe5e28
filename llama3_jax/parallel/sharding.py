"""Shardings of parameters and batches from the logical rules, and parameters created already sharded."""

import contextlib
from typing import Callable, Dict, Optional

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama3_jax.config import ModelConfig
from llama3_jax.model import Transformer
from llama3_jax.model.params import ModuleFn, init_boxed, param_shapes
from llama3_jax.parallel.rules import LOGICAL_AXIS_RULES, check_divisibility, mesh_rules


@contextlib.contextmanager
def mesh_context(mesh: Optional[Mesh]):
  """Trace and run under `mesh` with its logical rules (`mesh_rules`) active, so the model's
  activation constraints (`nn.with_logical_constraint`) take effect; None: as it is (no mesh)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules(mesh)):
    yield


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves carry logical axes (e.g. `param_shapes`, optimizer state)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_AXIS_RULES)


def param_shardings(cfg: ModelConfig, mesh: Mesh, module: ModuleFn = Transformer) -> Dict:
  """NamedSharding of every parameter of `module(cfg)` (default: the language model), after
  checking that the mesh divides every sharded shape."""
  check_divisibility(cfg, mesh)
  return logical_shardings(param_shapes(cfg, module), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, ...] arrays (e.g. [B, L] input rows) split over the batch axes along B, whole along the
  rest (the step splits the sequence)."""
  (rows,) = nn.logical_to_mesh_axes(("batch",), LOGICAL_AXIS_RULES)
  return NamedSharding(mesh, PartitionSpec(rows))


def create_sharded(
  make: Callable[[jax.Array], Dict], rng: jax.Array, mesh: Optional[Mesh], shardings
) -> Dict:
  """`nn.unbox(make(rng))` computed by XLA, each device creating only its shards (`shardings` on
  `mesh`; on the default device when `mesh` is None): no device ever holds the whole tree."""
  create = jax.jit(lambda r: nn.unbox(make(r)), out_shardings=shardings)
  with mesh_context(mesh):
    return create(rng)


def init_sharded_params(
  cfg: ModelConfig, mesh: Mesh, rng: jax.Array, module: ModuleFn = Transformer
) -> Dict:
  """Random parameters of `module(cfg)` (default: the language model) created in their shards."""
  shardings = param_shardings(cfg, mesh, module)
  return create_sharded(lambda r: init_boxed(cfg, r, module), rng, mesh, shardings)


def shard_params(
  params: Dict, cfg: ModelConfig, mesh: Mesh, module: ModuleFn = Transformer
) -> Dict:
  """Places host (e.g. converted checkpoint) parameters of `module(cfg)` onto the mesh, leaf by
  leaf."""
  return jax.tree.map(jax.device_put, params, param_shardings(cfg, mesh, module))


def bytes_per_device(tree) -> int:
  """Bytes of the arrays of `tree` held by one device (this process's first device's shards)."""
  device = jax.local_devices()[0]
  return sum(
    shard.data.nbytes
    for leaf in jax.tree_util.tree_leaves(tree)
    for shard in leaf.addressable_shards
    if shard.device == device
  )
