"""The loop core every training binary runs: steps, progress lines and metrics records, held-out
evaluation, checkpoints and resume, SIGTERM and SIGINT, the NaN/Inf streak, and where the time went.

A step is one batch trained on, whether its update was applied or skipped for a non-finite loss;
checkpoints are numbered by steps. Pretraining, SFT, the reward model and DPO are `Task`s: they
supply the jitted step, batch placement, held-out metrics and what to record; none has a loop.
"""

import dataclasses
import json
import math
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from llama3_jax.config import ModelConfig
from llama3_jax.config.base import ConfigBase
from llama3_jax.convert.step_integrity import describe
from llama3_jax.train.checkpointing import (
  DamagedStep,
  RunCheckpointer,
  any_process,
  check_resumable,
)
from llama3_jax.train.metrics import MetricsOutputs, MetricsSink
from llama3_jax.train.signals import StopRequest
from llama3_jax.train.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class FitPolicy(ConfigBase):
  """When things happen, in steps. Held-out metrics every `eval_every` steps (0: never) and at the
  last step, and before the first step and at the last with `eval_at_start`; none when a signal
  stops training early (the save comes first); a progress line at a session's first step, every
  `log_every` steps and at every evaluation; `max_nonfinite_steps` skipped steps in a row raise
  FloatingPointError. `peak_tflops_per_device` (0: unknown) turns TFLOP/s into MFU.
  `allow_data_change`: a resume may change the data settings (see `fit`)."""

  steps: int
  eval_every: int = 0
  eval_at_start: bool = False
  log_every: int = 10
  max_nonfinite_steps: int = 10
  peak_tflops_per_device: float = 0.0
  allow_data_change: bool = False

  def __post_init__(self):
    self._require_at_least(1, "steps", "log_every", "max_nonfinite_steps")
    self._require_at_least(0, "eval_every", "peak_tflops_per_device")

  def evaluates_at(self, step: int) -> bool:
    """Held-out metrics every `eval_every` steps, and at the last step when evaluating at all."""
    if step == self.steps:
      return bool(self.eval_every or self.eval_at_start)
    return bool(self.eval_every) and step % self.eval_every == 0


@dataclasses.dataclass(frozen=True)
class Task:
  """What a kind of training supplies to `fit`.

  `step(state, batch)` is the jitted update on a placed batch (state donated), returning the new
  state and scalar metrics (with `skipped`: the update was not applied); `place(batch)` puts a
  host batch's arrays onto the devices; `evaluate(params)` gives held-out metrics (recorded as
  `eval_<name>`); a progress line shows the record's entries named in `shown` (when present);
  `size(batch)` is this process's host batch's (shape: tokens trained on, training FLOPs; the
  loop records them for all processes as `batch_shape`). `run_config` (JSON) is saved with every
  checkpoint; a resume must match its `model` (architecture) and every data setting named in
  `resume_keys` ("a.b": run_config["a"]["b"]), compared after `canonical(stored run config)`
  (e.g. fields added since it was saved filled with their defaults). `extras()` adds entries to
  every record (e.g. a count of bad rows).
  """

  model: ModelConfig
  step: Callable[[TrainState, Dict], Tuple[TrainState, Dict]]
  place: Callable[[Dict], Dict]
  evaluate: Optional[Callable[[Any], Dict[str, float]]]
  shown: Sequence[str]
  size: Callable[[Dict], Tuple[Tuple[int, ...], float]]
  run_config: Dict
  resume_keys: Sequence[str] = ()
  check_position: Optional[Callable[[Dict, int], None]] = None
  extras: Callable[[], Dict] = dict
  canonical: Callable[[Dict], Dict] = lambda stored: stored


@dataclasses.dataclass
class TimeBreakdown:
  """Wall seconds by activity; goodput is the share spent in training steps. `data` is host time
  spent reading and placing batches, most of it while the devices run the step before."""

  compile: float = 0.0
  data: float = 0.0
  steps: float = 0.0
  evaluation: float = 0.0
  checkpointing: float = 0.0

  def summary(self, total: float) -> str:
    parts = ", ".join(
      f"{name} {seconds:.1f}s" for name, seconds in dataclasses.asdict(self).items()
    )
    return f"{total:.1f}s total: {parts}; goodput {self.steps / max(total, 1e-9):.1%}"


PROGRESS_KEY = "progress"  # in a checkpoint's run config: RunProgress.at(...)


@dataclasses.dataclass(frozen=True)
class RunProgress:
  """A run across its restarts: when it first started (epoch seconds), the productive step time
  (seconds) of the steps up to the checkpoint resumed from, and the restarts so far. Goodput is
  productive step time over wall time since the first start: steps retrained after a crash,
  restarts, compiles, saves and evaluations all count against it (the paper's "effective training
  time")."""

  started: float
  productive_s: float = 0.0
  restarts: int = 0

  @classmethod
  def resumed(cls, saved: Optional[Dict]) -> "RunProgress":
    if not saved:
      return cls(started=time.time())
    return cls(float(saved["started"]), float(saved["productive_s"]), int(saved["restarts"]) + 1)

  def at(self, session_steps_s: float) -> Dict:
    """To save with a checkpoint, after `session_steps_s` productive seconds in this session."""
    return dict(
      started=self.started, productive_s=self.productive_s + session_steps_s, restarts=self.restarts
    )

  def goodput(self, session_steps_s: float) -> float:
    return (self.productive_s + session_steps_s) / max(time.time() - self.started, 1e-9)

  def summary(self, session_steps_s: float) -> str:
    return (
      f"Goodput over the whole run ({self.restarts} restarts, "
      f"{(time.time() - self.started) / 60:.1f} min since its start): "
      f"{self.goodput(session_steps_s):.1%}"
    )


@dataclasses.dataclass
class FitResult:
  """The final state; the records of the start (step and, with `eval_at_start`, held-out
  metrics), of the last step and of every step of this session (`records`: those written to the
  metrics outputs); where the time went; the signal that stopped training early (after its save),
  None when it ran to the end."""

  state: TrainState
  first: Dict
  last: Dict
  times: TimeBreakdown
  stop_signal: Optional[int] = None
  records: Sequence[Dict] = ()


class _Throughput:
  """Tokens/s, TFLOP/s and ETA over the steps since the last new batch shape (whose first step
  compiles and is timed as compilation)."""

  def __init__(self):
    self.shapes = set()
    self._reset()

  def _reset(self):
    self.seconds, self.steps, self.tokens, self.flops = 0.0, 0, 0, 0.0

  def add(self, shape, flops: float, seconds: float, times: TimeBreakdown) -> None:
    if shape not in self.shapes:
      self.shapes.add(shape)
      times.compile += seconds
      self._reset()
      return
    times.steps += seconds
    self.seconds += seconds
    self.steps += 1
    self.tokens += math.prod(shape)
    self.flops += flops

  def record(self, remaining_steps: int, peak_tflops_per_device: float) -> Dict:
    if not self.steps:
      return {}
    record = dict(
      tokens_per_s=self.tokens / self.seconds,
      tflops_per_s=self.flops / self.seconds / 1e12,
      eta_s=self.seconds / self.steps * remaining_steps,
    )
    if peak_tflops_per_device:
      record["mfu"] = record["tflops_per_s"] / (peak_tflops_per_device * jax.device_count())
    return record


def _format_eta(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _number(value) -> str:
  return f"{value:.2e}" if isinstance(value, float) and 0 < abs(value) < 1e-2 else f"{value:.4f}"


def _progress_line(record: Dict, steps: int, shown: Sequence[str]) -> str:
  line = " | ".join(
    [f"step {record['step']}/{steps}"]
    + [f"{name} {_number(record[name])}" for name in shown if name in record]
  )
  if "tokens_per_s" in record:
    line += f" | {record['tokens_per_s']:,.0f} tok/s | {record['tflops_per_s']:.3f} TFLOP/s"
    if "mfu" in record:
      line += f" | MFU {record['mfu']:.1%}"
    line += f" | ETA {_format_eta(record['eta_s'])}"
  return line


def _scalar(value):
  value = np.asarray(value)
  if value.dtype == np.bool_:
    return bool(value)
  return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def _entry(tree: Dict, dotted: str):
  """`tree["a"]["b"]` for "a.b" (None where absent)."""
  for key in dotted.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def _restore(checkpointer: RunCheckpointer, step: int, task: Task, policy, abstract, batches):
  """The state saved as `step`, after checking the run may resume from it. The data settings
  named by `task.resume_keys` must match, unless `policy.allow_data_change`: the data then start
  afresh. Otherwise a batch iterator with a position (`get_state`) is moved to the saved one, any
  other advanced by `step` batches."""
  stored = checkpointer.stored_config(step)
  check_resumable(stored, task.model)
  current = json.loads(json.dumps(task.run_config))  # as stored: tuples are lists
  compared = json.loads(json.dumps(task.canonical(stored)))
  changed = [
    f"{k}: checkpoint {_entry(compared, k)!r} vs run {_entry(current, k)!r}"
    for k in task.resume_keys
    if _entry(compared, k) != _entry(current, k)
  ]
  where = f"{checkpointer.directory} step {step}"
  if changed and not policy.allow_data_change:
    raise ValueError(
      f"Cannot resume from {where}: the data differ ({'; '.join(changed)}); keep them, or "
      "allow the change (--allow_data_change), which starts the data afresh"
    )
  if changed:
    logging.warning("Resuming from %s with other data (%s): data from the start", where, changed)
  positioned = hasattr(batches, "get_state") and not changed
  state, _ = checkpointer.restore(step, abstract, batches if positioned else None)
  if positioned and task.check_position:
    problem = None
    try:
      task.check_position(batches.get_state(), step)
    except ValueError as e:
      problem = f"its data position is out of range: {e}"
    if any_process(problem is not None):  # every process falls back together
      raise DamagedStep(problem or "the data position of another process is out of range")
  if not changed and not positioned:
    for _ in range(step):
      next(batches)
  logging.info("Resumed from step %d in %s", step, checkpointer.directory)
  return state, stored


def _resume(checkpointer: RunCheckpointer, task: Task, policy, abstract, batches):
  """(step, state, its run config) of the newest step that is intact and restores undamaged
  (`_restore`), or (0, None, None) when the directory holds no step. Newer steps that fail are
  named and set aside; a directory whose every step fails is a ValueError naming each (nothing is
  set aside)."""
  damaged = {}
  while (step := checkpointer.intact_step(exclude=tuple(damaged))) is not None:
    try:
      state, stored = _restore(checkpointer, step, task, policy, abstract, batches)
    except DamagedStep as e:
      logging.warning("Step %d in %s is damaged: %s", step, checkpointer.directory, e)
      damaged[step] = str(e)
      continue
    checkpointer.rejected.update(damaged)
    if checkpointer.rejected:
      logging.warning(
        "Resuming from step %d of %s, the newest that is intact; newer steps fail: %s",
        step,
        checkpointer.directory,
        describe(checkpointer.rejected),
      )
      checkpointer.set_aside(newer_than=step)
    return step, state, stored
  failed = {**checkpointer.rejected, **damaged}
  if failed:
    raise ValueError(
      f"No step in {checkpointer.directory} can be resumed ({describe(failed)}); move them "
      "away to start afresh"
    )
  return 0, None, None


def fit(
  task: Task,
  batches: Iterator[Dict],
  policy: FitPolicy,
  init_state: Callable[[], TrainState],
  abstract_state: TrainState,
  checkpointer: Optional[RunCheckpointer] = None,
  metrics: Optional[MetricsOutputs] = None,
) -> FitResult:
  """Trains `task` on `batches` (host dicts of [B, ...] arrays) up to `policy.steps`.

  With `checkpointer`, a checkpoint there is resumed (its newest intact, undamaged step, restored
  into `abstract_state`: ShapeDtypeStructs with shardings), else the state is `init_state()`; the state
  (with the data position, when `batches` has `get_state`) is saved every `save_every` steps, at
  the end, and on SIGTERM or SIGINT, which end training after the current step; the directory
  is checked for room and locked against other runs for the time of training. Process 0 writes
  the records to the `metrics` outputs, one per step across resumes (and the start's with held-out
  metrics, on a fresh start). The next batch is read while the devices run the current step.
  """
  if not checkpointer:
    return _train(task, batches, policy, init_state, abstract_state, None, metrics)
  leaves = jax.tree.leaves(abstract_state)
  checkpointer.claim(sum(x.size * x.dtype.itemsize for x in leaves) // jax.process_count())
  try:
    return _train(task, batches, policy, init_state, abstract_state, checkpointer, metrics)
  finally:
    checkpointer.release()


def _train(task, batches, policy, init_state, abstract_state, checkpointer, metrics):
  """`fit` once the checkpoint directory (if any) is claimed."""
  started, times = time.perf_counter(), TimeBreakdown()
  step, state, stored = (
    _resume(checkpointer, task, policy, abstract_state, batches)
    if checkpointer
    else (0, None, None)
  )
  if state is None:
    state = init_state()
  progress = RunProgress.resumed((stored or {}).get(PROGRESS_KEY))
  positioned = hasattr(batches, "get_state")

  def evaluate(record):
    t = time.perf_counter()
    record.update({f"eval_{k}": v for k, v in task.evaluate(state.params).items()})
    times.evaluation += time.perf_counter() - t

  def draw():
    t = time.perf_counter()
    batch = next(batches)
    placed = task.place(batch)
    position = batches.get_state() if positioned else None
    times.data += time.perf_counter() - t
    return batch, placed, position

  first = last = {"step": step}
  if policy.eval_at_start and task.evaluate:
    evaluate(first)
  logging.info("Training from step %d to %d", step, policy.steps)
  stop, throughput, upcoming, stopping = StopRequest(), _Throughput(), None, False
  writing = metrics is not None and jax.process_index() == 0
  sink = metrics.open(step, task.run_config) if writing else MetricsSink()
  if step == 0 and len(first) > 1:
    sink.write(first)
  try:
    while step < policy.steps and not stopping:
      batch, placed, position = upcoming or draw()
      shape, flops = task.size(batch)
      shape, flops = (shape[0] * jax.process_count(), *shape[1:]), flops * jax.process_count()
      t, data_before = time.perf_counter(), times.data
      state, metrics = task.step(state, placed)
      upcoming = draw() if step + 1 < policy.steps and not stop.requested else None
      metrics = jax.device_get(metrics)
      throughput.add(shape, flops, time.perf_counter() - t - (times.data - data_before), times)
      step += 1
      last = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
      last["batch_shape"] = list(shape)
      last.update(throughput.record(policy.steps - step, policy.peak_tflops_per_device))
      last["run_goodput"] = progress.goodput(times.steps)
      last.update(task.extras())
      if last["skipped"]:
        logging.warning("Step %d: non-finite loss or gradient, update skipped", step)
        if int(state.nonfinite_streak) >= policy.max_nonfinite_steps:
          raise FloatingPointError(
            f"{policy.max_nonfinite_steps} consecutive steps had a NaN/Inf loss or gradient "
            f"(last loss {last.get('loss')}); stopping at step {step}"
          )
      stopping = stop.agreed()  # a signal: save first, then only what was due
      if checkpointer and (stopping or checkpointer.should_save(step) or step == policy.steps):
        t = time.perf_counter()
        stored = dict(task.run_config, process_count=jax.process_count())
        stored[PROGRESS_KEY] = progress.at(times.steps)
        checkpointer.save(step, state, position, stored)
        times.checkpointing += time.perf_counter() - t
      evaluated = task.evaluate is not None and policy.evaluates_at(step)
      if evaluated:
        evaluate(last)
      sink.write(last)
      session_first = step == first["step"] + 1  # its loss: that of the state trained from
      if (
        step % policy.log_every == 0
        or step == policy.steps
        or evaluated
        or stopping
        or session_first
      ):
        logging.info("%s", _progress_line(last, policy.steps, task.shown))
  finally:
    stop.restore()
    sink.close()
    if checkpointer:
      t = time.perf_counter()
      checkpointer.wait()
      times.checkpointing += time.perf_counter() - t
  logging.info("Time: %s", times.summary(time.perf_counter() - started))
  logging.info("%s", progress.summary(times.steps))
  stop_signal = stop.signum if step < policy.steps else None
  return FitResult(state, first, last, times, stop_signal, sink.records)
