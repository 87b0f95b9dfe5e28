"""Orbax checkpoints of a training run (train state, data-iterator position and the run config)
and the checks before resuming one.

Each save goes to a temporary directory that Orbax renames into place only once complete, so an
interrupted save never replaces the last good checkpoint; the newest complete step is restored.
"""

import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import grain
import orbax.checkpoint as ocp
import jax
from absl import logging

from llama3_jax.config import ModelConfig, architecture_differences
from llama3_jax.convert.orbax_io import RUN_CONFIG_ITEM, RUN_STATE_ITEM
from llama3_jax.train.checkpoint_dir import DirectoryLock, check_writable


class _DataPosition:
  """A data iterator's state taken earlier, in the form grain's checkpoint handler writes (one
  JSON file per process) and `grain.checkpoint.CheckpointRestore(iterator)` reads back."""

  def __init__(self, state: Dict):
    self._json = json.dumps(state, indent=2).encode()

  def get_state(self) -> bytes:
    return self._json


class CheckpointSaveError(RuntimeError):
  """A save that failed; the steps saved before it are intact."""


class RunCheckpointer:
  """Saves every `save_every` steps (asynchronously) and keeps the newest `keep` checkpoints.
  A run that writes claims the directory first (`claim`); readers need not."""

  def __init__(self, directory: str, save_every: int, keep: int = 3, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    check_writable(self.directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._lock = DirectoryLock(self.directory)

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
    return self._manager.latest_step()

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
    try:
      self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:
      raise self._failed(step, e) from e
    self._lock.refresh()
    logging.info("Checkpoint of step %d started in %s", step, self.directory)

  def restore(self, step: int, abstract_state, data_iterator) -> Tuple[Any, Dict]:
    """(state placed as `abstract_state`'s shardings say, run config); moves `data_iterator` to
    the saved position. The mesh may differ from the one that saved."""
    args = {
      RUN_STATE_ITEM: ocp.args.StandardRestore(abstract_state),
      RUN_CONFIG_ITEM: ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
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
      raise self._failed(self._manager.latest_step(), e) from e

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
