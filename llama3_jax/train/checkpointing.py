"""Orbax checkpoints of a training run (train state, data-iterator position and the run config)
and the checks before resuming one.

Each save goes to a temporary directory that Orbax renames into place only once complete, with
the step's manifest of file digests written just before (convert/step_integrity.py), so an
interrupted save never replaces the last good checkpoint. Resume takes the newest step that is
intact and restores with finite values; newer steps that are not are set aside, by name.
"""

import glob
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from llama3_jax.config import ModelConfig, architecture_differences
from llama3_jax.convert import step_integrity
from llama3_jax.convert.orbax_io import RUN_CONFIG_ITEM, RUN_STATE_ITEM
from llama3_jax.train.checkpoint_dir import DirectoryLock, check_writable

# A step set aside (not intact, or restoring non-finite values) is renamed to this, with its step.
SET_ASIDE_PREFIX = "rejected-step-"


class _DataPosition:
  """A data iterator's state taken earlier, in the form grain's checkpoint handler writes (one
  JSON file per process) and `grain.checkpoint.CheckpointRestore(iterator)` reads back."""

  def __init__(self, state: Dict):
    self._json = json.dumps(state, indent=2).encode()

  def get_state(self) -> bytes:
    return self._json


class CheckpointSaveError(RuntimeError):
  """A save that failed; the steps saved before it are intact."""


class DamagedStep(ValueError):
  """A step whose restored contents are unusable (non-finite values, a data position out of
  range); resume falls back to an older step."""


def _from_process_0(value):
  """Process 0's JSON-serialisable `value`, on every process (one broadcast of its bytes)."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(np.int64(0 if data is None else data.size)))
  padded = np.zeros(size, np.uint8) if data is None else data
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode())


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (an all-gather when there are several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(
    lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True, tree
  )


def nonfinite_entries(tree) -> list:
  """Paths ("params/layers/attention/wq") of the float arrays in `tree` holding a NaN or Inf."""
  flags = jax.device_get(_finite_leaves(tree))
  return [
    jax.tree_util.keystr(path, simple=True, separator="/")
    for path, finite in jax.tree_util.tree_flatten_with_path(flags)[0]
    if not bool(finite)
  ]


class RunCheckpointer:
  """Saves every `save_every` steps (asynchronously unless `async_save` is False) and keeps the
  newest `keep` checkpoints. A run that writes claims the directory first (`claim`); readers need
  not. Every step gets a manifest of its files' digests, written by process 0 once all processes'
  files are complete and before the step takes its name."""

  def __init__(self, directory: str, save_every: int, keep: int = 3, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self._async = async_save
    check_writable(self.directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      async_options=ocp.options.AsyncOptions(post_finalization_callback=self._seal),
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._lock = DirectoryLock(self.directory)
    self._sealing: Optional[int] = None
    self.rejected: Dict[int, str] = {}  # steps found not intact or damaged: why
    self._intact: Dict[Tuple[int, ...], Optional[int]] = {}  # intact_step's answers until a change

  def _seal(self) -> None:
    """Orbax's callback on process 0 when step `_sealing` is complete but not yet renamed: writes
    its manifest into the temporary directory (or the step, where saves are not renamed)."""
    step = self._sealing
    pending = glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*"))
    step_dir = pending[0] if len(pending) == 1 else os.path.join(self.directory, str(step))
    step_integrity.write_manifest(step_dir, step)

  def claim(self, state_bytes: int) -> None:
    """Before the first step: checks there is room for a save of `state_bytes` (this process's
    share) and, on process 0, takes the directory's lock (ValueError naming the run holding it)."""
    check_writable(self.directory, state_bytes)
    if jax.process_index() == 0:
      self._lock.acquire()

  def release(self) -> None:
    self._lock.release()

  def _failed(self, step: int, error: Exception) -> CheckpointSaveError:
    """The error of a failed save of `step`, its temporary directories removed."""
    for name in os.listdir(self.directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    return CheckpointSaveError(
      f"Saving step {step} to {self.directory} failed ({type(error).__name__}: "
      f"{str(error).splitlines()[0] if str(error) else ''}); the newest saved step is "
      f"{self._manager.latest_step()}"
    )

  def latest_step(self) -> Optional[int]:
    """The newest step saved, intact or not (see `intact_step`)."""
    return self._manager.latest_step()

  def intact_step(self, exclude: Tuple[int, ...] = ()) -> Optional[int]:
    """The newest intact step not in `exclude` (step_integrity.newest_intact, decided by process 0
    for all), or None; newer steps that are not intact are added to `rejected` on every process."""
    exclude = tuple(sorted(exclude))
    if exclude in self._intact:  # the steps were read and hashed already
      return self._intact[exclude]
    decision = None
    if jax.process_index() == 0:
      found, rejected = step_integrity.newest_intact(self.directory, exclude)
      decision = {"step": found, "rejected": {str(s): why for s, why in rejected.items()}}
    decision = _from_process_0(decision)
    self.rejected.update({int(s): why for s, why in decision["rejected"].items()})
    self._intact[exclude] = decision["step"]
    return decision["step"]

  def set_aside(self, newer_than: int) -> None:
    """Renames the rejected steps newer than `newer_than` to `rejected-step-N` (kept for
    inspection, out of the way of the saves to come), saying why."""
    for step in sorted(s for s in self.rejected if s > newer_than):
      source = os.path.join(self.directory, str(step))
      target, n = os.path.join(self.directory, f"{SET_ASIDE_PREFIX}{step}"), 1
      while os.path.exists(target):
        n += 1
        target = os.path.join(self.directory, f"{SET_ASIDE_PREFIX}{step}.{n}")
      if jax.process_index() == 0 and os.path.exists(source):
        os.rename(source, target)
      logging.warning(
        "Step %d set aside as %s: %s", step, os.path.basename(target), self.rejected[step]
      )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("llama3_jax set aside steps")
    self._manager.reload()
    self._intact.clear()

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, data_position: Optional[Dict], run_config: Dict) -> None:
    """Starts saving `state`, a data iterator's `get_state()` and `run_config` (JSON) as `step`."""
    args = {
      RUN_STATE_ITEM: ocp.args.StandardSave(state),
      RUN_CONFIG_ITEM: ocp.args.JsonSave(run_config),
    }
    if data_position is not None:
      args["data"] = grain.checkpoint.CheckpointSave(_DataPosition(data_position))
    self.wait()  # the step before is sealed (or its failure raised): `_sealing` is free
    self._intact.clear()
    try:
      self._sealing = step
      self._manager.save(step, args=ocp.args.Composite(**args), force=True)
      if not self._async:
        self._manager.wait_until_finished()
    except Exception as e:
      raise self._failed(step, e) from e
    self._lock.refresh()
    logging.info("Checkpoint of step %d started in %s", step, self.directory)

  def restore(self, step: int, abstract_state, data_iterator) -> Tuple[Any, Dict]:
    """(state placed as `abstract_state`'s shardings say, run config); moves `data_iterator` to
    the saved position. The mesh may differ from the one that saved. DamagedStep when a float
    array holds a NaN or Inf."""
    args = {
      RUN_STATE_ITEM: ocp.args.StandardRestore(abstract_state),
      RUN_CONFIG_ITEM: ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    nonfinite = nonfinite_entries(restored[RUN_STATE_ITEM])
    if nonfinite:
      raise DamagedStep(
        f"NaN or Inf in {len(nonfinite)} arrays of its state ({', '.join(nonfinite[:4])}"
        f"{', ...' if len(nonfinite) > 4 else ''})"
      )
    logging.info("Restored step %d from %s", step, self.directory)
    return restored[RUN_STATE_ITEM], restored[RUN_CONFIG_ITEM]

  def stored_config(self, step: int) -> Dict:
    """The run config saved with `step`, without reading any array."""
    args = ocp.args.Composite(**{RUN_CONFIG_ITEM: ocp.args.JsonRestore()})
    return self._manager.restore(step, args=args)[RUN_CONFIG_ITEM]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._failed(self._sealing, e) from e

  def close(self) -> None:
    self._manager.close()
    self.release()


def check_resumable(stored: Dict, model: ModelConfig) -> None:
  """Raises ValueError naming every model field where a checkpoint's run config `stored` differs
  from `model`, other than those in `COMPUTE_FIELDS`, or when it was saved by another number of
  processes (each process's data position is its own)."""
  saved_by = stored.get("process_count", 1)
  if saved_by != jax.process_count():
    raise ValueError(
      f"The checkpoint's data position was saved by {saved_by} processes and this run has "
      f"{jax.process_count()}: resume with {saved_by} processes (the mesh may differ), or restore "
      "only its state (RunCheckpointer.restore without a data iterator) into a new run"
    )
  differing = architecture_differences(model.to_dict(), stored["model"])
  if differing:
    details = "; ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, b, a in differing)
    raise ValueError(f"Checkpoint does not match the model config: {details}")
