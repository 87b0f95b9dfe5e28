"""The one table from logical axis names (model code) to mesh axes, and checks that shapes divide."""

import math
from typing import Tuple

import flax.linen as nn
import jax
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.model import param_shapes

# (logical axis, mesh axes: None, a name or a tuple of names) pairs.
Rules = Tuple[Tuple[str, object], ...]

# FSDP shards the parameters' `embed` axis; tensor parallelism shards heads, kv heads, the FFN
# hidden axis and the vocabulary (Megatron style); the batch is split over data and fsdp; context
# parallelism splits the sequence (`length`), while keys and values (`kv_length`) are gathered.
LOGICAL_AXIS_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("length", "context"),
  ("kv_length", None),
  ("layers", "pipeline"),
  ("stage", "pipeline"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_head_dim", None),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


def mesh_rules(mesh) -> Rules:
  """The rules in effect on `mesh` (a Mesh or AbstractMesh): the table, or none on a one-device
  mesh, where there is nothing to place and the constraints would only keep XLA from fusing
  across them."""
  return LOGICAL_AXIS_RULES if mesh.size > 1 else ()


def axes_tuple(axes) -> Tuple[str, ...]:
  """A rule's mesh axes (None, one name or several) as a tuple."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_axes(logical: str) -> Tuple[str, ...]:
  """The mesh axes that the logical axis `logical` is split over (empty: replicated)."""
  for name, axes in LOGICAL_AXIS_RULES:
    if name == logical:
      return axes_tuple(axes)
  raise ValueError(f"Logical axis {logical!r} has no rule in LOGICAL_AXIS_RULES")


def check_divisibility(cfg: ModelConfig, mesh: Mesh) -> None:
  """Raises ValueError naming the parameter, axis and degree when a sharded dimension does not divide."""
  boxed = param_shapes(cfg)
  leaves = jax.tree_util.tree_leaves_with_path(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    for size, logical in zip(leaf.value.shape, leaf.names):
      axes = mesh_axes(logical)
      degree = math.prod(mesh.shape[a] for a in axes)
      if size % degree:
        raise ValueError(
          f"Parameter {name}: its {logical!r} dimension of size {size} is not divisible by mesh "
          f"axes {axes} of degree {degree} (model {cfg.name}, mesh {dict(mesh.shape)})"
        )


def batch_degree(mesh) -> int:
  """How many ways the batch dimension is split on `mesh` (a Mesh or AbstractMesh)."""
  return math.prod(mesh.shape[a] for a in mesh_axes("batch"))
