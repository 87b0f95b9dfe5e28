"""Pretraining (and SFT, whose rows carry target masks) as a task of the loop core (train/fit.py):
the Layout of the run, its state created or restored in shards, grain batches with their saved
position, next-token steps, and held-out loss over batches read once."""

import functools
import math
from typing import Dict, Iterator, List, Optional, Tuple

import jax
from absl import logging

from llama3_jax.config import DataConfig, OptimizerConfig, RunConfig
from llama3_jax.convert.orbax_io import MODEL_KIND_KEY
from llama3_jax.data import MalformedCounter, make_pipeline
from llama3_jax.data.pipeline import check_position
from llama3_jax.data.ramp import stage_of_step
from llama3_jax.parallel import mesh_context
from llama3_jax.parallel.layout import Layout
from llama3_jax.train.checkpointing import RunCheckpointer
from llama3_jax.train.fit import FitPolicy, FitResult, Task, fit
from llama3_jax.train.flops import train_flops_per_token
from llama3_jax.train.metrics import MetricsOutputs
from llama3_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama3_jax.train.train_state import TrainState, abstract_train_state, create_train_state

SHOWN = ("loss", "lr", "grad_norm", "eval_loss")
# The data settings a resume must keep (CheckpointConfig.allow_data_change lifts this).
DATA_KEYS = tuple(
  f"data.{field}"
  for field in (
    "sources",
    "seed",
    "seq_len",
    "global_batch_size",
    "ramp",
    "held_out_fraction",
    "shuffle",
    "row_shuffle_window",
  )
)
# Optimizer fields that follow from --steps: a resume that changes only these (and the steps)
# keeps the checkpoint's schedule.
_STEP_DERIVED = ("warmup_steps", "decay_steps", "anneal_steps")


def _size(model_cfg):
  """host batch -> ([rows, targets per row], training FLOPs)."""

  def size(batch):
    rows, row_len = batch["tokens"].shape
    shape = (rows, row_len - 1)
    return shape, train_flops_per_token(model_cfg, row_len - 1) * math.prod(shape)

  return size


class HeldOut:
  """Mean loss per target over the first `eval_batches` held-out batches, read from the data
  sources once and kept on the host."""

  def __init__(self, run: RunConfig, tokenizer, layout: Layout):
    self._run, self._tokenizer = run, tokenizer
    self._place, self._loss = layout.place, layout.jit_eval()
    self._batches: Optional[List[Dict]] = None

  def batches(self) -> List[Dict]:
    if self._batches is None:
      eval_data = make_pipeline(
        self._run.data,
        self._tokenizer,
        split="eval",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      self._batches = [batch for _, batch in zip(range(self._run.train.eval_batches), eval_data)]
    return self._batches

  def __call__(self, params) -> Dict[str, float]:
    ce_total, count_total = 0.0, 0
    for batch in self.batches():
      ce_sum, count = self._loss(params, self._place(batch))
      ce_total, count_total = ce_total + float(ce_sum), count_total + int(count)
    return {"loss": ce_total / max(count_total, 1)}


def pretraining_task(
  run: RunConfig, tokenizer, layout: Layout, schedule, malformed: MalformedCounter
) -> Task:
  """The loop core's Task for `run` on `layout`, with AdamW on `schedule`: (optimizer config,
  total steps), see `schedule_of`."""
  train_cfg, (optimizer, total_steps) = run.train, schedule
  tx = make_optimizer(optimizer, total_steps)
  return Task(
    model=run.model,
    step=layout.jit_train_step(tx, learning_rate_schedule(optimizer, total_steps)),
    place=layout.place,
    evaluate=HeldOut(run, tokenizer, layout) if train_cfg.eval_every else None,
    shown=SHOWN,
    size=_size(run.model),
    run_config={
      **run.to_dict(),
      MODEL_KIND_KEY: "lm",
      "schedule": {"optimizer": optimizer.to_dict(), "steps": total_steps},
    },
    resume_keys=DATA_KEYS,
    check_position=functools.partial(
      check_position, data_cfg=run.data, process_count=jax.process_count()
    ),
    extras=lambda: {"malformed_rows": malformed.total} if malformed.total else {},
    canonical=_canonical,
  )


def _canonical(stored: Dict) -> Dict:
  """A stored run config with its data settings as today's DataConfig writes them (fields added
  since, such as DataSource.whole_documents, at their defaults)."""
  return {**stored, "data": DataConfig.from_dict(stored["data"]).to_dict()}


def _fit_policy(run: RunConfig, until: int) -> FitPolicy:
  train_cfg = run.train
  return FitPolicy(
    steps=until,
    eval_every=train_cfg.eval_every,
    log_every=train_cfg.log_every,
    max_nonfinite_steps=train_cfg.max_nonfinite_steps,
    peak_tflops_per_device=train_cfg.peak_tflops_per_device,
    allow_data_change=run.checkpoint.allow_data_change,
  )


def schedule_of(run: RunConfig, stored: Optional[Dict]) -> Tuple[OptimizerConfig, int]:
  """(optimizer config, total steps) of the learning-rate schedule to train with: `run`'s, or,
  resuming from a checkpoint whose run config is `stored`, the checkpoint's when the run changes
  only the steps (and the schedule fields derived from them): steps past it run at its floor."""
  if stored is None:
    return run.optimizer, run.train.steps
  kept = stored.get(
    "schedule", {"optimizer": stored["optimizer"], "steps": stored["train"]["steps"]}
  )
  optimizer, steps = OptimizerConfig.from_dict(kept["optimizer"]), kept["steps"]
  derived = {field: getattr(run.optimizer, field) for field in _STEP_DERIVED}
  if (optimizer, steps) == (run.optimizer, run.train.steps) or optimizer.replace(
    **derived
  ) != run.optimizer:
    return run.optimizer, run.train.steps
  logging.info(
    "Keeping the checkpoint's learning-rate schedule (warmup %d, decay %d, anneal %d over %d "
    "steps) for this run of %d steps; steps past it run at its floor",
    optimizer.warmup_steps,
    optimizer.decay_steps,
    optimizer.anneal_steps,
    steps,
    run.train.steps,
  )
  return optimizer, steps


def train_run(
  run: RunConfig,
  tokenizer,
  *,
  init_params: Optional[Dict] = None,
  metrics: Optional[MetricsOutputs] = None,
  batches: Optional[Iterator[Dict]] = None,
  until: Optional[int] = None,
  layout: Optional[Layout] = None,
) -> FitResult:
  """Trains up to step `until` (default: the run's last, `run.train.steps`), resuming from the
  newest checkpoint in `run.checkpoint.directory` if there is one, else from `init_params` (host
  arrays, e.g. a converted checkpoint) or a random init. The learning-rate schedule spans
  `run.train.steps` whatever `until` is, so a run trained in parts (the long-context stages,
  each on a mesh of its own) is the run trained at once. The ramp stages from the next step on
  (of a part of the run: those its steps reach) must fit the mesh. `batches` replaces the run's
  training data (a grain iterator of it by default; one with `get_state` has its position
  saved); `layout`, the run's Layout when the caller has built it."""
  until = run.train.steps if until is None else until
  if not 1 <= until <= run.train.steps:
    raise ValueError(f"until={until} is not a step of this run of {run.train.steps} steps")
  if layout is None:
    layout = Layout.build(run.model, run.mesh, run.train)  # logs the degrees and pipeline schedule
  layout.check_layers()
  checkpointer, stored, latest = None, None, None
  if run.checkpoint.directory:
    settings = run.checkpoint
    checkpointer = RunCheckpointer(
      settings.directory, settings.save_every, settings.keep, settings.async_save
    )
    latest = checkpointer.intact_step()
    stored = None if latest is None else checkpointer.stored_config(latest)
  stages = run.data.stages  # those from the next step on; a part of a run: those it reaches
  last = stage_of_step(stages, until) if until < run.train.steps else len(stages) - 1
  for stage in stages[stage_of_step(stages, min(until, (latest or 0) + 1)) : last + 1]:
    layout.check_batch(
      stage.global_batch_size, stage.seq_len, where=f"the stage from token {stage.start_tokens}"
    )
  malformed = MalformedCounter()
  if batches is None:
    batches = make_pipeline(
      run.data,
      tokenizer,
      split="train",
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      counter=malformed,
    )
  schedule = schedule_of(run, stored)
  tx = make_optimizer(*schedule)

  def init_state() -> TrainState:
    rng = jax.random.key(run.data.seed)
    return create_train_state(run.model, tx, layout.mesh, rng, params=init_params)[0]

  try:
    with mesh_context(layout.mesh):
      return fit(
        pretraining_task(run, tokenizer, layout, schedule, malformed),
        batches,
        _fit_policy(run, until),
        init_state,
        abstract_train_state(run.model, tx, layout.mesh),
        checkpointer,
        metrics,
      )
  finally:
    if checkpointer:
      checkpointer.close()


def train(
  run: RunConfig,
  tokenizer,
  *,
  init_params: Optional[Dict] = None,
  metrics: Optional[MetricsOutputs] = None,
) -> TrainState:
  """`train_run`'s final state."""
  return train_run(run, tokenizer, init_params=init_params, metrics=metrics).state
