"""Model averaging (Llama 3 paper, Sec. 4): the uniform or weighted mean of the parameters of models
of one architecture, e.g. RM, SFT or DPO runs on different data or hyperparameters, or the
checkpoints of pretraining's final annealing phase (Polyak averaging).
"""

import functools
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh

from llama3_jax.config import COMPUTE_FIELDS, ModelConfig, architecture_differences
from llama3_jax.convert import load_checkpoint
from llama3_jax.model.spec import shapes_by_name

# Models differing only in these fields (and the stored parameter dtype) average.
_NON_ARCHITECTURE_FIELDS = frozenset(COMPUTE_FIELDS + ("param_dtype",))


def normalized_weights(weights: Optional[Sequence[float]], count: int) -> List[float]:
  """`count` averaging weights summing to 1: uniform for None, else `weights` divided by their sum.

  Raises ValueError unless `weights` holds `count` finite, non-negative numbers with a positive sum.
  """
  if weights is None:
    return [1.0 / count] * count
  weights = [float(weight) for weight in weights]
  if len(weights) != count:
    raise ValueError(f"Got {len(weights)} weights for {count} models; need one weight per model")
  if not all(math.isfinite(weight) for weight in weights):
    raise ValueError(f"Weights must be finite numbers, got {weights}")
  negative = [weight for weight in weights if weight < 0]
  if negative:
    raise ValueError(f"Weights must be non-negative, got negative weights {negative} in {weights}")
  total = sum(weights)
  if total <= 0:
    raise ValueError(f"Weights sum to zero ({weights}); at least one weight must be positive")
  return [weight / total for weight in weights]


def _leaves_by_name(tree) -> Dict[str, object]:
  """'layers/attention/wq' -> leaf (numpy or jax array), in flattening order."""
  return dict(zip(shapes_by_name(tree), jax.tree.leaves(tree)))


@functools.partial(jax.jit, donate_argnums=0)
def _add_scaled(total, leaf, weight):
  """total + weight * leaf, in total's dtype and sharding (total's buffer reused)."""
  return total + weight * leaf.astype(total.dtype)


class _WeightedSum:
  """Running sum of weight * params over trees added one at a time.

  Holds one float32 accumulator per leaf, on the devices and in the sharding of the reference's
  leaf (the default device for numpy leaves), so averaging N models needs the memory of the sum
  plus the one model being added, not N models; on a mesh, each device holds its shards only.
  """

  def __init__(self, reference, reference_name: str):
    """`reference` (a params tree) fixes the parameter names, shapes, output dtypes, shardings and
    structure."""
    self._reference_name = reference_name
    self._treedef = jax.tree.structure(reference)
    leaves = _leaves_by_name(reference)
    self._dtypes = {name: leaf.dtype for name, leaf in leaves.items()}
    self._sums = {
      name: jnp.zeros(
        leaf.shape, jnp.float32, device=leaf.sharding if isinstance(leaf, jax.Array) else None
      )
      for name, leaf in leaves.items()
    }

  def _check_matches(self, leaves: Dict[str, object], tree_name: str) -> None:
    missing = sorted(set(self._sums) - set(leaves))
    unexpected = sorted(set(leaves) - set(self._sums))
    if missing or unexpected:
      raise ValueError(
        f"{tree_name} does not have the parameters of {self._reference_name}: missing "
        f"{missing}, unexpected {unexpected}"
      )
    for name, total in self._sums.items():
      shape = tuple(leaves[name].shape)
      if shape != total.shape:
        raise ValueError(
          f"Parameter {name!r} has shape {shape} in {tree_name} but {total.shape} in "
          f"{self._reference_name}"
        )

  def add(self, tree, weight: float, tree_name: str) -> None:
    """Adds `weight` * `tree`; raises ValueError naming the parameters that do not match."""
    leaves = _leaves_by_name(tree)
    self._check_matches(leaves, tree_name)
    for name in self._sums:
      self._sums[name] = _add_scaled(self._sums[name], leaves[name], weight)

  def result(self):
    """The sum as a tree shaped like the reference, each leaf a jax array in the reference leaf's
    dtype and sharding. Consumes the accumulators: call once."""
    names = list(self._sums)
    leaves = [self._sums.pop(name).astype(self._dtypes[name]) for name in names]
    return jax.tree.unflatten(self._treedef, leaves)


def average_params(param_trees: Sequence, weights: Optional[Sequence[float]] = None):
  """Uniform (weights None) or weighted average of N >= 1 params trees of one structure and shapes.

  Args:
    param_trees: params pytrees of numpy or jax arrays; leaves of equal path have equal shapes.
    weights: N non-negative numbers with a positive sum, normalised to sum to 1; None is uniform.

  Returns:
    A tree shaped like the first one, of jax arrays in the first tree's leaf dtypes and
    shardings, computed with float32 accumulation.
  """
  trees = list(param_trees)
  if not trees:
    raise ValueError("average_params needs at least one params tree, got none")
  fractions = normalized_weights(weights, len(trees))
  total = _WeightedSum(trees[0], "params tree 0")
  for index, (tree, fraction) in enumerate(zip(trees, fractions)):
    total.add(tree, fraction, f"params tree {index}")
  return total.result()


def _check_same_architecture(
  cfg: ModelConfig, path: str, reference_cfg: ModelConfig, reference_path: str
) -> None:
  """Raises ValueError naming every architecture field of `cfg` that differs from the reference."""
  differences = [
    f"{field} ({found!r} vs {expected!r})"
    for field, found, expected in architecture_differences(
      cfg.to_dict(), reference_cfg.to_dict(), _NON_ARCHITECTURE_FIELDS
    )
  ]
  if differences:
    raise ValueError(
      f"Checkpoint {path} and the first checkpoint {reference_path} have mismatched "
      "architectures; differing fields (this vs first): " + ", ".join(differences)
    )


def average_checkpoints(
  paths: Sequence[str],
  weights: Optional[Sequence[float]] = None,
  mesh: Optional[Mesh] = None,
  kind: str = "lm",
  **overrides,
) -> Tuple[ModelConfig, Dict]:
  """(config, averaged params) of checkpoints of one architecture and model `kind` ("lm" or
  "reward"), in any format we read.

  Checkpoints are read one at a time with `load_checkpoint(path, param_dtype="float32",
  **overrides)` and added to a running weighted sum, so memory stays at about two models; with
  `mesh`, read in shards and summed on the mesh, so each device holds 2/N of a model's shards.

  Args:
    paths: N >= 1 checkpoint directories (ours, a training run's step checkpoints, Hugging Face
      or Meta consolidated).
    weights: N non-negative numbers with a positive sum, normalised to sum to 1; None is uniform.
    mesh: place and sum the params in their shards on this mesh; None: the default device.
    **overrides: ModelConfig fields passed to `load_checkpoint` (`param_dtype` included).

  Returns:
    The first checkpoint's config and the averaged params (jax arrays, float32 by default).

  Raises:
    FileNotFoundError: a path does not exist (checked before anything is read).
    ValueError: bad weights, or checkpoints whose architectures (configs ignoring name, dtypes,
      attention_impl, remat_policy and max_seq_len) differ.
  """
  paths = list(paths)
  if not paths:
    raise ValueError("average_checkpoints needs at least one checkpoint path, got none")
  fractions = normalized_weights(weights, len(paths))
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Checkpoint path {path} does not exist")
  load_overrides = {"param_dtype": "float32", **overrides}
  reference_cfg, total = None, None
  for path, fraction in zip(paths, fractions):
    cfg, params = load_checkpoint(path, mesh=mesh, kind=kind, **load_overrides)
    if total is None:
      reference_cfg, total = cfg, _WeightedSum(params, f"checkpoint {path}")
    _check_same_architecture(cfg, path, reference_cfg, paths[0])
    logging.info("Adding checkpoint %s (%s) with weight %.6g", path, cfg.name, fraction)
    total.add(params, fraction, f"checkpoint {path}")
    del params
  logging.info("Averaged %d checkpoints of %s", len(paths), reference_cfg.name)
  return reference_cfg, total.result()
