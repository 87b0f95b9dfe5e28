"""A run's checkpoint directory made safe to write: checked before the first step (a directory,
writable, room for a save), and claimed by one run at a time with a lock file.

The lock (`LOCK_FILE`, JSON: host, pid, job id, start time) is created atomically by process 0. A
second run is refused by name; a lock left by a run that was killed is taken over: on the same
host when its process is gone, on another host when it has not been refreshed (each save touches
it) for `STALE_SECONDS`.
"""

import json
import os
import shutil
import socket
import tempfile
import time
from typing import Optional

from absl import logging

LOCK_FILE = ".llama3_jax.lock"
STALE_SECONDS = 3600


def check_writable(directory: str, needed_bytes: int = 0) -> None:
  """Raises NotADirectoryError / PermissionError / OSError naming `directory` unless it is (or can
  be created as) a writable directory with `needed_bytes` free."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(f"Checkpoint directory {directory} exists and is not a directory")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
      pass
  except OSError as e:
    raise PermissionError(f"Checkpoint directory {directory} is not writable: {e}") from None
  free = shutil.disk_usage(directory).free
  if free < needed_bytes:
    raise OSError(
      f"Checkpoint directory {directory} has {free / 2**30:.2f} GiB free; a save of this run "
      f"takes {needed_bytes / 2**30:.2f} GiB"
    )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class DirectoryLock:
  """The claim of one run on `directory` (see the module docstring)."""

  def __init__(self, directory: str, job_id: Optional[str] = None):
    self.path = os.path.join(directory, LOCK_FILE)
    self.owner = dict(
      host=socket.gethostname(), pid=os.getpid(), job=job_id or "", since=time.time()
    )
    self.held = False

  def _holder(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:
      return {}  # written half-way by a run killed at start-up: stale

  def _stale(self, holder: dict) -> bool:
    if not holder:
      return True
    if holder.get("host") == self.owner["host"]:
      return not _alive(int(holder.get("pid", -1)))
    return time.time() - os.path.getmtime(self.path) > STALE_SECONDS

  def acquire(self) -> None:
    """Claims the directory; ValueError naming the run holding it otherwise."""
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          continue  # released meanwhile
        if not self._stale(holder):
          raise ValueError(
            f"Checkpoint directory {os.path.dirname(self.path)} is in use by another run (pid "
            f"{holder.get('pid')} on {holder.get('host')}, job {holder.get('job') or '-'}, since "
            f"{time.ctime(holder.get('since', 0))}); wait for it to end, or use another "
            f"--checkpoint_dir. If that run is gone, delete {self.path}"
          )
        logging.warning("Taking over the stale lock %s of %s", self.path, holder)
        os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self.owner, f)
      self.held = True
      return

  def refresh(self) -> None:
    """Marks the claim alive (its modification time) for runs on other hosts."""
    if self.held:
      os.utime(self.path)

  def release(self) -> None:
    if self.held and self._holder() == self.owner:
      os.remove(self.path)
    self.held = False
