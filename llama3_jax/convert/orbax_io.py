"""Our checkpoint format: `llama3_jax_config.json` (ModelConfig.to_dict and the model kind) + an
Orbax checkpoint of the params pytree under `params/`; and reading the params of a training run's
step checkpoints (`state/` + `config/`, as RunCheckpointer writes them). Both hold either kind of
model (model/spec.py), told by the params tree ("backbone" + "score" for a reward model) and,
where recorded (`model_kind`; older checkpoints lack it), checked against the kind recorded.

Saves go to a temporary sibling directory renamed into place, so an interrupted save never leaves a
half-written checkpoint at `path` nor destroys the one that was there.
"""

import dataclasses
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
from llama3_jax.convert import step_integrity
from llama3_jax.convert.config_files import read_json_object
from llama3_jax.model.spec import LM, ModelSpec, spec_of, tree_kind

CONFIG_FILE = "llama3_jax_config.json"
PARAMS_DIR = "params"
# The items of a training run's step directory, as RunCheckpointer writes them: the TrainState
# (its "params" entry is the model's) and the run config (JSON; "model": ModelConfig.to_dict()).
RUN_STATE_ITEM = "state"
RUN_CONFIG_ITEM = "config"
# The model kind ("lm", "reward") in our config file and in a run config; absent in older ones.
MODEL_KIND_KEY = "model_kind"


def is_orbax_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
    os.path.join(path, PARAMS_DIR)
  )


def save_orbax(
  path: str, cfg: ModelConfig, params: Dict, overwrite: bool = False, kind: str = LM.kind
) -> None:
  """Writes `cfg`, the model `kind` ("lm", "reward") and `params` (numpy or jax arrays, possibly
  sharded) as a checkpoint directory.

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
  spec = spec_of(kind, " to save")
  spec.check(cfg, params, "Params to save")
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
      json.dump({MODEL_KIND_KEY: spec.kind, **cfg.to_dict()}, f, indent=2)
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
  logging.info("Saved %s (%s) checkpoint to %s", cfg.name, spec.description, path)


@dataclasses.dataclass(frozen=True)
class _Stored:
  """What a checkpoint holds, from its config and array metadata alone: the model's spec and
  config, and the Orbax `directory` whose `entry` (None: the whole tree) are the params, of
  shapes `tree`."""

  spec: ModelSpec
  cfg_dict: Dict
  directory: str
  entry: Optional[str]
  tree: Dict
  what: str


def _stored(
  directory: str, recorded_kind: Optional[str], cfg_dict: Dict, what: str, entry=None
) -> _Stored:
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(directory).item_metadata.tree
  if entry is not None:
    if entry not in tree:
      raise ValueError(f"{what} holds no {entry!r} entry; found {sorted(tree)}")
    tree = tree[entry]
  spec = spec_of(tree_kind(tree))
  if recorded_kind is not None and spec_of(recorded_kind, f" recorded in {what}") is not spec:
    raise ValueError(
      f"{what} records {MODEL_KIND_KEY} {recorded_kind!r}, but its params are a "
      f"{spec.description}'s (top-level entries {sorted(tree)}): a corrupt checkpoint, or one "
      f"saved with the wrong kind"
    )
  return _Stored(spec, cfg_dict, directory, entry, tree, what)


def _restore(stored: _Stored, mesh: Optional[Mesh], overrides: Dict) -> Tuple[ModelConfig, Dict]:
  """(config with `overrides`, params) of `stored` after checking its tree against the config:
  numpy arrays in the config's dtypes, or arrays placed in their shards on `mesh`."""
  try:
    cfg = ModelConfig.from_dict(stored.cfg_dict)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{stored.what} records a model config that is not valid: {e}") from None
  cfg = cfg.replace(**overrides)
  stored.spec.check(cfg, stored.tree, stored.what)
  # Each leaf in the config's dtype for it: `param_dtype`, or an fp8 model's e4m3 and scales.
  expected = nn.unbox(stored.spec.param_shapes(cfg))
  if mesh is None:
    restore_args = jax.tree.map(
      lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype), expected
    )
  else:
    restore_args = jax.tree.map(
      lambda leaf, sharding: ocp.ArrayRestoreArgs(sharding=sharding, dtype=leaf.dtype),
      expected,
      stored.spec.shardings(cfg, mesh),
    )
  with ocp.PyTreeCheckpointer() as checkpointer:
    if stored.entry is None:
      params = checkpointer.restore(
        stored.directory, args=ocp.args.PyTreeRestore(restore_args=restore_args)
      )
    else:
      params = checkpointer.restore(
        stored.directory,
        args=ocp.args.PyTreeRestore(
          item={stored.entry: jax.tree.map(lambda _: 0, stored.tree)},
          restore_args={stored.entry: restore_args},
          partial_restore=True,
        ),
      )[stored.entry]
  logging.info(
    "Loaded %s (%s, %s) from %s", cfg.name, stored.spec.description, cfg.param_dtype, stored.what
  )
  return cfg, params


def _orbax_stored(path: str) -> _Stored:
  config_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"No {CONFIG_FILE} in checkpoint directory {path}")
  params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"No {PARAMS_DIR}/ directory in checkpoint {path}")
  cfg_dict = read_json_object(config_file)
  kind = cfg_dict.pop(MODEL_KIND_KEY, None)
  return _stored(params_dir, kind, cfg_dict, f"Checkpoint {path}")


def orbax_kind(path: str) -> str:
  """The model kind of a checkpoint written by `save_orbax`, without reading any array."""
  return _orbax_stored(path).spec.kind


def load_orbax(path: str, mesh: Optional[Mesh] = None, **overrides) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a checkpoint written by `save_orbax`, of whichever kind it holds
  (`orbax_kind`): numpy params, or params placed in their shards on `mesh` (no host ever holds
  the whole model).

  Overrides are ModelConfig fields; params are cast to the resulting `param_dtype`.
  """
  return _restore(_orbax_stored(path), mesh, overrides)


def _is_run_step(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, item)) for item in (RUN_STATE_ITEM, RUN_CONFIG_ITEM))


def is_run_checkpoint(path: str) -> bool:
  """`path` is one step of a training run's checkpoints (`state/` + `config/`, as
  `RunCheckpointer` writes them) or a run's directory of such steps, intact or not."""
  return _is_run_step(path) or any(
    _is_run_step(os.path.join(path, str(step))) for step in step_integrity.step_numbers(path)
  )


def run_steps(directory: str) -> List[int]:
  """The intact steps (step_integrity.py) of a training run's checkpoint directory, oldest first."""
  return [
    step
    for step in step_integrity.step_numbers(directory)
    if step_integrity.problem(os.path.join(directory, str(step))) is None
  ]


def run_step_directory(path: str) -> str:
  """The step to read: `path` if it is one step of a training run, which must be intact, else the
  newest intact step of the run directory `path` (the rule resume follows). ValueError naming what
  is wrong with the step, or with each step when none is intact; FileNotFoundError without any."""
  if _is_run_step(path):
    found = step_integrity.problem(path)
    if found:
      raise ValueError(f"Training checkpoint {path} is not intact: {found}")
    return path
  step, rejected = step_integrity.newest_intact(path)
  if step is None and not rejected:
    raise FileNotFoundError(f"{path} holds no training-run checkpoint (state/ and config/)")
  if step is None:
    raise ValueError(
      f"{path} holds no intact training-run step ({step_integrity.describe(rejected)})"
    )
  if rejected:
    logging.warning(
      "Reading step %d of %s; newer steps are not intact: %s",
      step,
      path,
      step_integrity.describe(rejected),
    )
  return os.path.join(path, str(step))


def _run_stored(path: str) -> _Stored:
  step_dir = os.path.abspath(run_step_directory(path))
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    run_config = checkpointer.restore(os.path.join(step_dir, RUN_CONFIG_ITEM))
  if "model" not in run_config:
    raise ValueError(
      f"The run config of {step_dir} has no 'model' entry; found {sorted(run_config)}"
    )
  return _stored(
    os.path.join(step_dir, RUN_STATE_ITEM),
    run_config.get(MODEL_KIND_KEY),
    run_config["model"],
    f"Training checkpoint {step_dir}",
    entry="params",
  )


def run_model_config(path: str) -> ModelConfig:
  """The model config of a training run's checkpoint (a step, or the run's directory for its
  newest step), without reading any array."""
  return ModelConfig.from_dict(_run_stored(path).cfg_dict)


def run_kind(path: str) -> str:
  """The model kind of a training run's checkpoint (a step, or the run's directory for its newest
  step), without reading any array."""
  return _run_stored(path).spec.kind


def load_run_checkpoint(
  path: str, mesh: Optional[Mesh] = None, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) of a training run's checkpoint (pretraining, SFT, DPO or a reward model): a
  step directory, or the run's checkpoint directory for its newest step. Only the params are
  read, not the optimizer state; numpy params, or params placed in their shards on `mesh`.

  Overrides are ModelConfig fields; params are cast to the resulting `param_dtype`.
  """
  return _restore(_run_stored(path), mesh, overrides)
