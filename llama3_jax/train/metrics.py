"""Where a training run's step records go: JSON lines, TensorBoard event files, a Weights & Biases
run; each holds one record per step across resumes (the steps after the one resumed from are
dropped or hidden before the run writes them again).

A record is a dict with `step` (batches trained on) and scalar entries (`loss`, `lr`, `eval_loss`,
`tokens_per_s`, ...; None for a non-finite number), as `fit` writes them.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

from absl import logging

from llama3_jax.config.base import ConfigBase


@dataclasses.dataclass(frozen=True)
class MetricsOutputs(ConfigBase):
  """A JSON-lines file, a TensorBoard log directory and a W&B project (each None: not written);
  `wandb_run` names the W&B run and is its id, so a resumed run logs into the same one (default:
  a name of the run's directory)."""

  jsonl: Optional[str] = None
  tensorboard_dir: Optional[str] = None
  wandb_project: Optional[str] = None
  wandb_run: Optional[str] = None

  @classmethod
  def beside(cls, checkpoint_dir: Optional[str], **given) -> "MetricsOutputs":
    """The outputs `given`, a None one filled by its default next to `checkpoint_dir`'s steps
    (`metrics.jsonl`, `tensorboard/`; the W&B run named after the directory); '' turns one off."""
    defaults = {}
    if checkpoint_dir:
      directory = os.path.abspath(checkpoint_dir)
      defaults = dict(
        jsonl=os.path.join(directory, JSONL_NAME),
        tensorboard_dir=os.path.join(directory, TENSORBOARD_NAME),
        wandb_run=f"{os.path.basename(directory)}-{hashlib.sha1(directory.encode()).hexdigest()[:8]}",
      )
    chosen = {
      field.name: given.get(field.name)
      if given.get(field.name) is not None
      else defaults.get(field.name)
      for field in dataclasses.fields(cls)
    }
    return cls(**{name: value or None for name, value in chosen.items()})

  def open(self, resumed_step: int, run_config: Dict) -> "MetricsSink":
    """The writers of these outputs for a run resumed at `resumed_step` (0: a fresh start), which
    writes the records of the steps after it; `run_config` (JSON) goes to W&B as the run's
    config."""
    writers = []
    if self.jsonl:
      writers.append(JsonLinesWriter(self.jsonl, resumed_step))
    if self.tensorboard_dir:
      writers.append(TensorBoardWriter(self.tensorboard_dir, resumed_step))
    if self.wandb_project:
      writers.append(WandbWriter(self.wandb_project, self.wandb_run, resumed_step, run_config))
    return MetricsSink(writers)


JSONL_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"


def finite(record: Dict) -> Dict:
  """`record` with NaN and infinite numbers as None (JSON has no NaN)."""
  return {
    k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
  }


def scalars(record: Dict) -> Dict[str, float]:
  """The numeric entries of `record` but `step` (booleans as 0/1; None and lists left out)."""
  return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def read_records(path: str) -> List[Dict]:
  """The records of a JSON-lines metrics file, one per step (the last written wins), in step
  order. A last line that does not parse (a write cut off by a crash) is left out; any other line
  that is not a record is a ValueError naming it (the file is not a metrics file)."""
  by_step = {}
  with open(path) as f:
    lines = f.read().split("\n")
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      by_step[int(record["step"])] = record
    except (ValueError, KeyError, TypeError):
      if number < len(lines) - 1 or line.endswith("}"):
        raise ValueError(
          f"{path}:{number} is not a metrics record (a JSON object with a step); is it a "
          "metrics file? Choose another path for the metrics"
        ) from None
      logging.warning("%s:%d is cut off (a write stopped by a crash); left out", path, number)
  return [by_step[step] for step in sorted(by_step)]


class JsonLinesWriter:
  """Appends records to `path`, after rewriting it (atomically) without the records of steps past
  `resumed_step`, which the resumed run writes again (all of them on a fresh start, 0)."""

  def __init__(self, path: str, resumed_step: int):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
      kept = [r for r in read_records(path) if r["step"] <= resumed_step] if resumed_step else []
      partial = f"{path}.partial"
      with open(partial, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(partial, path)
    self._file = open(path, "a")

  def write(self, record: Dict) -> None:
    self._file.write(json.dumps(finite(record)) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def tensorboard_tag(name: str) -> str:
  """`eval_loss` -> `eval/loss`; any other entry under `train/`."""
  return f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"


class TensorBoardWriter:
  """Scalars of every record in TensorBoard event files under `directory` (tensorboardX). A
  resumed run's file starts with a purge at the step after `resumed_step` (0 on a fresh start):
  TensorBoard hides every earlier event at that step or later."""

  def __init__(self, directory: str, resumed_step: int):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(
      directory,
      purge_step=resumed_step + 1 if resumed_step else 0,
      filename_suffix=f".{time.time_ns()}",  # one file per session, also within one second
    )

  def write(self, record: Dict) -> None:
    for name, value in scalars(record).items():
      self._writer.add_scalar(tensorboard_tag(name), value, record["step"])
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class WandbWriter:
  """Records logged to the W&B run `run` of `project` (created, or resumed under the same id);
  steps the run already holds are not logged again (W&B keeps steps increasing)."""

  def __init__(self, project: str, run: Optional[str], resumed_step: int, run_config: Dict):
    try:
      import wandb
    except ImportError:
      raise ValueError(
        f"--wandb_project {project}: W&B is not installed (pip install 'llama3_jax[wandb]')"
      ) from None
    self._run = wandb.init(
      project=project, name=run, id=run, resume="allow" if run else None, config=run_config
    )
    self._logged_to = self._run.step - 1  # the run's next step is `step`
    logging.info("W&B run %s (resumed at step %d)", self._run.id, resumed_step)

  def write(self, record: Dict) -> None:
    if record["step"] > self._logged_to:
      self._run.log(scalars(record), step=record["step"])
      self._logged_to = record["step"]

  def close(self) -> None:
    self._run.finish()


class MetricsSink:
  """Writes each record to every writer and keeps this session's records (`records`)."""

  def __init__(self, writers: Sequence = ()):
    self._writers = list(writers)
    self.records: List[Dict] = []

  def write(self, record: Dict) -> None:
    self.records.append(record)
    for writer in self._writers:
      writer.write(record)

  def close(self) -> None:
    for writer in self._writers:
      writer.close()
