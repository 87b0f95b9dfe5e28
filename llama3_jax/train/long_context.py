"""The long-context extension as a run in stages (config/long_context_config.py): one pretraining
run whose data ramp is the stages' shapes, trained stage by stage, each stage on its own mesh (the
checkpoint of the stage before restores onto it), and evaluated at each stage's end: held-out loss
at a short row length (the paper's short-context recovery) and needle-in-a-haystack retrieval at
the lengths reached so far."""

import dataclasses
import math
from typing import Dict, List, Optional

import jax
import numpy as np
from absl import logging

from llama3_jax.config import LongContextConfig, RunConfig
from llama3_jax.data.haystack import Haystack, build_prompt
from llama3_jax.eval import niah
from llama3_jax.parallel.layout import Layout
from llama3_jax.train.loop import HeldOut, train_run
from llama3_jax.train.metrics import MetricsOutputs


@dataclasses.dataclass(frozen=True)
class StageEvaluation:
  """Settings of the evaluation at each stage's end: held-out loss over rows of `short_seq_len`
  tokens (as many rows as a step's tokens make, rounded up to the mesh's batch splits); NIAH with
  `needles` (each count; none: no NIAH) at every stage length reached, over `depths`, `samples`
  prompts each (see eval/niah.py)."""

  short_seq_len: int
  depths: tuple
  needles: tuple = (1,)
  samples: int = 4
  haystack: str = "passkey"
  batch_size: int = 4
  seed: int = 0


def _short_rows(plan: LongContextConfig, evaluation: StageEvaluation, layout: Layout) -> int:
  """Rows of the short-context batches: a step's tokens, in whole rows per batch split and
  process."""
  multiple = math.lcm(layout.batch_degree * layout.batch_splits, jax.process_count())
  rows = max(1, plan.tokens_per_step // evaluation.short_seq_len)
  return -(-rows // multiple) * multiple


def _stage(index: int) -> str:
  return f"long-context stage {index + 1}"


def stage_runs(
  run: RunConfig, plan: LongContextConfig, evaluation: StageEvaluation, tokenizer
) -> List[RunConfig]:
  """The run of each stage: `run` (its model, optimizer, data sources, checkpoints) with the
  plan's batch shapes as its data ramp, the plan's steps, and the stage's mesh (default the
  run's). Every stage's run is the same run but for the mesh, so each resumes the one before.
  Before anything trains, ValueError naming the stage when its batch, the held-out batches or the
  short-context batches do not fit its mesh, or naming a NIAH setting that cannot be built."""
  whole = run.replace(
    data=plan.data_config(run.data), train=run.train.replace(steps=plan.total_steps)
  )
  runs = [whole.replace(mesh=stage.mesh or run.mesh) for stage in plan.stages]
  first = plan.stages[0]
  for i, (stage_run, stage) in enumerate(zip(runs, plan.stages)):
    try:
      layout = Layout.build(stage_run.model, stage_run.mesh, stage_run.train)
      layout.check_layers()
    except ValueError as e:
      raise ValueError(f"{_stage(i)}: {e}") from None
    layout.check_batch(plan.rows(i), stage.seq_len, where=_stage(i))
    if run.train.eval_every:  # the loop's held-out batches have the first stage's shape
      layout.check_batch(plan.rows(0), first.seq_len, where=f"held-out rows in {_stage(i)}")
    rows = _short_rows(plan, evaluation, layout)
    layout.check_batch(rows, evaluation.short_seq_len, where=f"short-context rows in {_stage(i)}")
  haystack = Haystack.named(tokenizer, evaluation.haystack)
  for count in evaluation.needles:
    for depth in evaluation.depths:
      build_prompt(haystack, first.seq_len, depth, count, np.random.default_rng(0))
  return runs


def short_context_loss(
  run: RunConfig, tokenizer, layout: Layout, params, seq_len: int, rows: int
) -> float:
  """Mean held-out loss per target over `run.train.eval_batches` batches of `rows` rows of
  `seq_len` tokens."""
  short = run.replace(data=run.data.replace(seq_len=seq_len, global_batch_size=rows, ramp=()))
  return HeldOut(short, tokenizer, layout)(params)["loss"]


def train_stage(
  runs: List[RunConfig],
  plan: LongContextConfig,
  index: int,
  tokenizer,
  evaluation: StageEvaluation,
  *,
  init_params: Optional[Dict] = None,
  metrics: Optional[MetricsOutputs] = None,
):
  """Trains stage `index` (resuming inside it, or from the stage before) and evaluates its end.
  Returns (FitResult, summary record, NIAH records); no evaluation (None, []) when a signal
  stopped training early or the run's checkpoint is already past the stage's end (the stage's
  parameters are gone). NIAH runs in single-process jobs only (generation is not multi-host)."""
  run, stage = runs[index], plan.stages[index]
  end = plan.end_step(index)
  layout = Layout.build(run.model, run.mesh, run.train)
  result = train_run(
    run, tokenizer, init_params=init_params, metrics=metrics, until=end, layout=layout
  )
  if result.stop_signal is not None:
    return result, None, []
  if result.last["step"] != end:
    logging.warning(
      "%s ends at step %d but its run resumed at step %d: not evaluated",
      _stage(index),
      end,
      result.last["step"],
    )
    return result, None, []
  params = result.state.params
  first = plan.stages[0]
  if "eval_loss" in result.last and evaluation.short_seq_len == first.seq_len:
    short = result.last["eval_loss"]  # the loop's held-out loss: the same rows
  else:
    rows = _short_rows(plan, evaluation, layout)
    short = short_context_loss(run, tokenizer, layout, params, evaluation.short_seq_len, rows)
  records = []
  if jax.process_count() == 1:
    lengths = sorted({s.seq_len for s in plan.stages[: index + 1]})
    for count in evaluation.needles:
      for record in niah.evaluate(
        run.model,
        params,
        tokenizer,
        lengths=lengths,
        depths=evaluation.depths,
        needles=count,
        samples=evaluation.samples,
        haystack=evaluation.haystack,
        seed=evaluation.seed,
        mesh=layout.mesh,
        batch_size=evaluation.batch_size,
      ):
        records.append({"stage": index, "step": end, **record})
  else:
    logging.warning("NIAH skipped: generation runs in single-process jobs only")
  summary = dict(
    stage=index,
    seq_len=stage.seq_len,
    rows=plan.rows(index),
    step=end,
    mesh=layout.degrees,
    short_context_loss=short,
    short_seq_len=evaluation.short_seq_len,
    niah={
      str(count): niah.scores_by_length([r for r in records if r["needles"] == count])
      for count in evaluation.needles
    },
  )
  return result, summary, records
