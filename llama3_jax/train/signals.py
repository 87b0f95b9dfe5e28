"""SIGTERM (preemption) and SIGINT (Ctrl-C) turned into a request to save and stop after the
current step; a second Ctrl-C aborts at once. A binary stopped this way exits 128 + the signal's
number after its save, as a shell reports a process ended by that signal."""

import signal
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """While alive (until `restore`), the first SIGTERM or SIGINT sets `signum`; `requested` then
  holds until the loop has saved and stopped."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt("second Ctrl-C: aborting without saving")
    name = signal.Signals(signum).name
    logging.warning("%s: saving a checkpoint and stopping after this step", name)
    if self.signum is None:
      self.signum = signum

  def agreed(self) -> bool:
    """Whether any process has a request, every process calling this at the same step (one
    all-gather of the signal numbers when there are several), so that all save and stop at the
    same step; a process without a signal of its own takes the first process's."""
    if jax.process_count() == 1:
      return self.requested
    signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
    first = next((int(s) for s in np.ravel(signums) if s), None)
    if self.signum is None:
      self.signum = first
    return first is not None

  def restore(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def exit_code(signum: int) -> int:
  """The exit status of a run stopped by signal `signum` after saving: 128 + signum."""
  return 128 + signum
