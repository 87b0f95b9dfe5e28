"""One description per model kind, the language model ("lm") and the reward model ("reward"): its
Flax module, its parameters' shapes with logical axes, their creation or placement directly in
their shards, and the check of a parameter tree against a config. Checkpoint readers and writers
(convert/) find a kind's spec here by its name.

Not imported by `llama3_jax.model` itself: it builds on `llama3_jax.parallel`, which imports the
model package.
"""

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.model.params import ModuleFn, param_shapes
from llama3_jax.model.reward_model import RewardModel, init_score
from llama3_jax.model.transformer import Transformer
from llama3_jax.parallel.sharding import (
  create_sharded,
  init_sharded_params,
  param_shardings,
  shard_params,
)


def shapes_by_name(tree) -> Dict[str, Tuple[int, ...]]:
  """'layers/attention/wq' -> shape, for every leaf of a params-like tree (arrays or metadata)."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in key_path): tuple(leaf.shape)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model kind: `module(cfg)` is its Flax module, `param_shapes(cfg)` its parameters as
  ShapeDtypeStructs boxed in `nn.LogicallyPartitioned` (their logical axes), and
  `init(cfg, mesh, rng)` random parameters created directly in their shards on `mesh`."""

  kind: str
  description: str
  module: ModuleFn
  param_shapes: Callable[[ModelConfig], Dict]
  init: Callable[[ModelConfig, Mesh, jax.Array], Dict]

  def shardings(self, cfg: ModelConfig, mesh: Mesh) -> Dict:
    """NamedSharding of every parameter, after checking that the mesh divides every sharded
    shape."""
    return param_shardings(cfg, mesh, self.module)

  def shard(self, cfg: ModelConfig, params: Dict, mesh: Mesh) -> Dict:
    """`params` (host or device arrays) checked, then placed leaf by leaf into their shards."""
    self.check(cfg, params, f"The {self.description}'s params")
    return shard_params(params, cfg, mesh, self.module)

  def check(self, cfg: ModelConfig, tree, what: str) -> None:
    """Raises ValueError naming every missing, unexpected or wrongly shaped tensor of `tree`
    (arrays or shape metadata) against this kind's parameters for `cfg`."""
    expected = shapes_by_name(nn.unbox(self.param_shapes(cfg)))
    found = shapes_by_name(tree)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
      raise ValueError(
        f"{what} does not match the {self.description} of config {cfg.name}: missing tensors "
        f"{missing}, unexpected tensors {extra}"
      )
    wrong = [
      f"tensor {name!r} has shape {found[name]} but the config expects {shape}"
      for name, shape in expected.items()
      if found[name] != shape
    ]
    if wrong:
      raise ValueError(f"{what} ({self.description}, config {cfg.name}): " + "; ".join(wrong))


LM = ModelSpec("lm", "language model", Transformer, param_shapes, init_sharded_params)
REWARD = ModelSpec(
  "reward",
  "reward model",
  RewardModel,
  functools.partial(param_shapes, module=RewardModel),
  functools.partial(init_sharded_params, module=RewardModel),
)
SPECS = {spec.kind: spec for spec in (LM, REWARD)}


def spec_of(kind: str, where: str = "") -> ModelSpec:
  """The spec of model kind `kind`; ValueError naming the known kinds (and `where`) otherwise."""
  if kind not in SPECS:
    raise ValueError(f"Unknown model kind {kind!r}{where}; known kinds: {sorted(SPECS)}")
  return SPECS[kind]


def tree_kind(tree: Dict) -> str:
  """The kind of a params tree (arrays or metadata) by its top-level entries: a reward model's
  holds "backbone" and "score"; any other is taken for a language model's."""
  return REWARD.kind if {"backbone", "score"} <= set(tree) else LM.kind


def reward_params_from_lm(
  cfg: ModelConfig, lm_params: Dict, rng: jax.Array, mesh: Optional[Mesh] = None
) -> Dict:
  """Reward-model params: the backbone is `lm_params` without its "output" head, the very arrays
  given (on the host, or in their shards when the language model was loaded with a mesh); the
  scalar head [dim] is new, created in its shard on `mesh` (on the default device without).
  Nothing else is created."""
  backbone = {name: value for name, value in lm_params.items() if name != "output"}
  shardings = None if mesh is None else REWARD.shardings(cfg, mesh)["score"]
  params = {
    "backbone": backbone,
    "score": create_sharded(lambda r: init_score(r, cfg), rng, mesh, shardings),
  }
  REWARD.check(cfg, params, "Reward params from the language model")
  return params
