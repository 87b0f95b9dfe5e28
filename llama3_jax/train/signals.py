"""SIGTERM (preemption) and SIGINT (Ctrl-C) turned into a request to save and stop after the
current step; a second Ctrl-C aborts at once. A binary stopped this way exits 128 + the signal's
number after its save, as a shell reports a process ended by that signal."""

import signal
from typing import Optional

from absl import logging

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

  def restore(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def exit_code(signum: int) -> int:
  """The exit status of a run stopped by signal `signum` after saving: 128 + signum."""
  return 128 + signum
