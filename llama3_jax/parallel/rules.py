"""The one table from logical axis names (model code) to mesh axes, and checks that shapes divide."""

import math
from typing import Tuple

import flax.linen as nn
import jax
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.model import param_shapes

# FSDP shards the parameters' `embed` axis; tensor parallelism shards heads, kv heads, the FFN
# hidden axis and the vocabulary (Megatron style); the batch is split over data and fsdp; context
# parallelism splits the sequence (`length`), while keys and values (`kv_length`) are gathered.
LOGICAL_AXIS_RULES: Tuple[Tuple[str, object], ...] = (
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


def mesh_axes(logical: str) -> Tuple[str, ...]:
  """The mesh axes that the logical axis `logical` is split over (empty: replicated)."""
  for name, axes in LOGICAL_AXIS_RULES:
    if name == logical:
      return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
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


def batch_degree(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in mesh_axes("batch"))
