"""Our checkpoint format: `llama3_jax_config.json` (ModelConfig.to_dict) + an Orbax checkpoint of the
params pytree under `params/`; and reading the params of a training run's step checkpoints.

Saves go to a temporary sibling directory renamed into place, so an interrupted save never leaves a
half-written checkpoint at `path` nor destroys the one that was there.
"""

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.model import param_shapes
from llama3_jax.parallel import param_shardings

CONFIG_FILE = "llama3_jax_config.json"
PARAMS_DIR = "params"
# A training run's step directory, as RunCheckpointer writes it.
RUN_STATE_DIR = "state"
RUN_CONFIG_DIR = "config"


def is_orbax_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
    os.path.join(path, PARAMS_DIR)
  )


def shapes_by_name(tree) -> Dict[str, Tuple[int, ...]]:
  """'layers/attention/wq' -> shape, for every leaf of a params-like tree."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in key_path): tuple(leaf.shape)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _check_shapes(cfg: ModelConfig, tree, what: str) -> None:
  """Raises ValueError unless `tree` has exactly the parameters of `cfg`, with their shapes."""
  expected = shapes_by_name(nn.unbox(param_shapes(cfg)))
  found = shapes_by_name(tree)
  missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
  if missing or extra:
    raise ValueError(
      f"{what} does not match the config ({cfg.name}): missing tensors {missing}, "
      f"unexpected tensors {extra}"
    )
  for name, shape in expected.items():
    if found[name] != shape:
      raise ValueError(
        f"{what}: tensor {name!r} has shape {found[name]} but the config "
        f"({cfg.name}) expects {shape}"
      )


def save_orbax(path: str, cfg: ModelConfig, params: Dict, overwrite: bool = False) -> None:
  """Writes `cfg` and `params` (numpy or jax arrays, possibly sharded) as a checkpoint directory.

  Single-process (conversion and export); `param_dtype` is recorded as the params' dtype.

  An existing checkpoint at `path` is replaced only with `overwrite=True`; any other existing
  non-empty directory is never replaced.
  """
  if jax.process_count() > 1:
    raise ValueError(
      "save_orbax writes from a single process (its temporary directory is local); "
      f"this job has {jax.process_count()} processes"
    )
  path = os.path.abspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    if not is_orbax_checkpoint(path):
      raise FileExistsError(
        f"{path} exists and is not a llama3_jax checkpoint; refusing to replace it"
      )
    if not overwrite:
      raise FileExistsError(f"Checkpoint {path} already exists; pass overwrite=True to replace it")
  _check_shapes(cfg, params, "Params to save")
  dtypes = {jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)}
  if len(dtypes) == 1 and cfg.param_dtype not in dtypes:
    (dtype,) = dtypes
    logging.info(
      "Recording param_dtype=%s (the params' dtype) instead of %s", dtype, cfg.param_dtype
    )
    cfg = cfg.replace(param_dtype=dtype)

  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  old = None
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
      checkpointer.wait_until_finished()
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rename(path, os.path.join(old, base))
    os.rename(tmp, path)
  except BaseException:
    if old is not None and not os.path.exists(path):
      os.rename(os.path.join(old, base), path)  # put the previous checkpoint back
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old)  # empty by now
    raise
  if old is not None:
    shutil.rmtree(old)
  logging.info("Saved %s checkpoint to %s", cfg.name, path)


def _restore_params(
  directory: str, cfg: ModelConfig, what: str, mesh: Optional[Mesh], subtree: Optional[str] = None
) -> Dict:
  """The params pytree stored in Orbax `directory` (or its `subtree` entry, read alone) in
  `cfg.param_dtype`: numpy arrays, or arrays placed in their shards on `mesh`."""
  dtype = jnp.dtype(cfg.param_dtype)
  with ocp.PyTreeCheckpointer() as checkpointer:
    stored = checkpointer.metadata(directory).item_metadata.tree
    if subtree is not None:
      if subtree not in stored:
        raise ValueError(f"{what} holds no {subtree!r} entry; found {sorted(stored)}")
      stored = stored[subtree]
    _check_shapes(cfg, stored, what)
    if mesh is None:
      restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), stored
      )
    else:
      restore_args = jax.tree.map(
        lambda _, sharding: ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype),
        stored,
        param_shardings(cfg, mesh),
      )
    if subtree is None:
      return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    restored = checkpointer.restore(
      directory,
      args=ocp.args.PyTreeRestore(
        item={subtree: jax.tree.map(lambda _: 0, stored)},
        restore_args={subtree: restore_args},
        partial_restore=True,
      ),
    )
    return restored[subtree]


def load_orbax(path: str, mesh: Optional[Mesh] = None, **overrides) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a checkpoint written by `save_orbax`: numpy params, or params placed
  in their shards on `mesh` (no host ever holds the whole model).

  Overrides are ModelConfig fields; params are cast to the resulting `param_dtype`.
  """
  config_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"No {CONFIG_FILE} in checkpoint directory {path}")
  with open(config_file) as f:
    cfg = ModelConfig.from_dict(json.load(f)).replace(**overrides)
  params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"No {PARAMS_DIR}/ directory in checkpoint {path}")
  params = _restore_params(params_dir, cfg, f"Checkpoint {path}", mesh)
  logging.info("Loaded %s checkpoint %s, params %s", cfg.name, path, cfg.param_dtype)
  return cfg, params


def _is_run_step(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, item)) for item in (RUN_STATE_DIR, RUN_CONFIG_DIR))


def run_steps(directory: str) -> List[int]:
  """The steps saved (complete) in a training run's checkpoint directory, oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(name)
    for name in os.listdir(directory)
    if name.isdigit() and _is_run_step(os.path.join(directory, name))
  )


def run_step_directory(path: str) -> Optional[str]:
  """`path` if it is one step of a training run's checkpoints (`state/` + `config/`, as
  `RunCheckpointer` writes them), the newest step if `path` is the run's checkpoint directory,
  else None."""
  if _is_run_step(path):
    return path
  steps = run_steps(path)
  return os.path.join(path, str(steps[-1])) if steps else None


def load_run_checkpoint(
  path: str, mesh: Optional[Mesh] = None, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) of a training run's checkpoint (pretraining or SFT): a step directory, or
  the run's checkpoint directory for its newest step. Only the params are read, not the
  optimizer state; numpy params, or params placed in their shards on `mesh`.

  Overrides are ModelConfig fields; params are cast to the resulting `param_dtype`.
  """
  step_dir = run_step_directory(path)
  if step_dir is None:
    raise FileNotFoundError(f"{path} holds no training-run checkpoint (state/ and config/)")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    stored = checkpointer.restore(os.path.join(os.path.abspath(step_dir), RUN_CONFIG_DIR))
  if "model" not in stored:
    raise ValueError(f"The run config of {step_dir} has no 'model' entry; found {sorted(stored)}")
  cfg = ModelConfig.from_dict(stored["model"]).replace(**overrides)
  what = f"Training checkpoint {step_dir}"
  params = _restore_params(os.path.join(step_dir, RUN_STATE_DIR), cfg, what, mesh, "params")
  logging.info("Loaded the params of %s (%s), %s", step_dir, cfg.name, cfg.param_dtype)
  return cfg, params
