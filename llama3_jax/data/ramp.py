"""The batch-size / sequence-length ramp: batches whose shape changes with the training tokens read.

Stage i's batches come from its own row pipeline (pack -> row shuffle -> batch). When the tokens read
reach the next stage's `start_tokens`, that stage's packer starts where the current packer stopped,
so the document stream continues across the change of row length: no document is restarted or
repeated. Rows the current stage packed but did not hand out (the rest of its row-shuffle window)
are skipped. Each stage change happens once per run, so the model compiles once per shape.
"""

from collections.abc import Callable, Sequence
from typing import Any, Optional

import grain

from llama3_jax.config.data_config import BatchStage
from llama3_jax.data.packing import PackDatasetIterator

# (stage index, packer state to start from or None) -> that stage's batch iterator.
StageBuilder = Callable[[int, Optional[dict]], grain.DatasetIterator]


def tokens_after(stages: Sequence[BatchStage], steps: int) -> int:
  """Global training tokens read after `steps` batches of the ramp `stages` (RampDatasetIterator):
  each batch is of the last stage whose start the tokens read before it have reached."""
  tokens = 0
  for i, stage in enumerate(stages):
    if not steps:
      break
    end = stages[i + 1].start_tokens if i + 1 < len(stages) else None
    taken = (
      steps if end is None else min(steps, max(0, -(-(end - tokens) // stage.tokens_per_batch)))
    )
    tokens, steps = tokens + taken * stage.tokens_per_batch, steps - taken
  return tokens


def stage_of_step(stages: Sequence[BatchStage], step: int) -> int:
  """Index of the stage whose shape the batch of `step` (1-based) has."""
  tokens = tokens_after(stages, step - 1)
  return max(i for i, s in enumerate(stages) if s.start_tokens <= tokens)


def _packer(batches: grain.DatasetIterator) -> PackDatasetIterator:
  """The packer inside a stage's iterator chain."""
  pending = [batches]
  while pending:
    iterator = pending.pop()
    if isinstance(iterator, PackDatasetIterator):
      return iterator
    pending.extend(iterator._parents)
  raise ValueError(f"No PackDatasetIterator in {batches}")


class RampDatasetIterator(grain.DatasetIterator):
  """Batches of the stage that the training tokens read so far (global, all processes) are in.

  State: {"stage": index, "tokens": global training tokens read, "batches": the stage's state}.
  """

  def __init__(self, stages: Sequence[BatchStage], build: StageBuilder):
    super().__init__()
    self._stages = tuple(stages)
    self._build = build
    self._stage = 0
    self._tokens = 0
    self._batches = None
    self._batches = build(0, None)

  def _due_stage(self) -> int:
    """The last stage whose start the tokens read have reached."""
    return max(i for i, s in enumerate(self._stages) if s.start_tokens <= self._tokens)

  def __next__(self) -> dict[str, Any]:
    due = self._due_stage()
    if due != self._stage:
      packer_state = _packer(self._batches).get_state()
      self._batches.close()
      self._stage, self._batches = due, self._build(due, packer_state)
    batch = next(self._batches)
    self._tokens += self._stages[self._stage].tokens_per_batch
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"stage": self._stage, "tokens": self._tokens, "batches": self._batches.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    stage = int(state["stage"])
    if not 0 <= stage < len(self._stages):
      raise ValueError(f"Data state is in stage {stage}; this ramp has {len(self._stages)} stages")
    self._batches.close()
    self._stage, self._tokens = stage, int(state["tokens"])
    self._batches = self._build(stage, None)
    self._batches.set_state(state["batches"])

  def close(self) -> None:
    if self._batches is not None:
      self._batches.close()
    super().close()

  def __str__(self) -> str:
    return f"RampDatasetIterator(stages={self._stages})"
