"""The long-context extension as a run in stages (config/long_context_config.py): one pretraining
run whose data ramp is the stages' shapes, trained stage by stage, each stage on its own mesh (the
checkpoint of the stage before restores onto it), and evaluated at each stage's end: held-out loss
at a short row length (the paper's short-context recovery) and needle-in-a-haystack retrieval at
the lengths reached so far."""

import dataclasses
from typing import Dict, List, Optional

from llama3_jax.config import LongContextConfig, RunConfig
from llama3_jax.eval import niah
from llama3_jax.parallel.layout import Layout
from llama3_jax.train.loop import HeldOut, train_run


def stage_runs(run: RunConfig, plan: LongContextConfig) -> List[RunConfig]:
  """The run of each stage: `run` (its model, optimizer, data sources, checkpoints) with the
  plan's batch shapes as its data ramp, the plan's steps, and the stage's mesh (default the
  run's). Every stage's run is the same run but for the mesh, so each resumes the one before.
  ValueError naming the stage when its batch does not fit its mesh."""
  whole = run.replace(
    data=plan.data_config(run.data), train=run.train.replace(steps=plan.total_steps)
  )
  runs = [whole.replace(mesh=stage.mesh or run.mesh) for stage in plan.stages]
  for i, (stage_run, stage) in enumerate(zip(runs, plan.stages)):  # named errors before training
    try:
      layout = Layout.build(stage_run.model, stage_run.mesh, stage_run.train)
      layout.check_layers()
    except ValueError as e:
      raise ValueError(f"long-context stage {i + 1}: {e}") from None
    layout.check_batch(plan.rows(i), stage.seq_len, where=f"long-context stage {i + 1}")
  return runs


def short_context_loss(
  run: RunConfig, tokenizer, layout: Layout, params, seq_len: int, rows: int
) -> float:
  """Mean held-out loss per target over `run.train.eval_batches` batches of `rows` rows (rounded
  up to the layout's batch shards) of `seq_len` tokens."""
  shards = layout.batch_degree
  rows = -(-rows // shards) * shards
  short = run.replace(data=run.data.replace(seq_len=seq_len, global_batch_size=rows, ramp=()))
  return HeldOut(short, tokenizer, layout)(params)["loss"]


@dataclasses.dataclass(frozen=True)
class StageEvaluation:
  """Settings of the evaluation at each stage's end: held-out loss over rows of `short_seq_len`
  tokens; NIAH with `needles` (each count) at every stage length reached, over `depths`."""

  short_seq_len: int
  depths: tuple
  needles: tuple = (1,)
  samples: int = 4
  haystack: str = "passkey"
  batch_size: int = 4
  seed: int = 0


def train_stage(
  runs: List[RunConfig],
  plan: LongContextConfig,
  index: int,
  tokenizer,
  evaluation: StageEvaluation,
  *,
  init_params: Optional[Dict] = None,
  metrics_file: Optional[str] = None,
):
  """Trains stage `index` (resuming inside it, or from the stage before) and evaluates its end.
  Returns (FitResult, summary record, NIAH records); no evaluation (None, []) when a signal
  stopped training early."""
  run, stage = runs[index], plan.stages[index]
  result = train_run(
    run, tokenizer, init_params=init_params, metrics_file=metrics_file, until=plan.end_step(index)
  )
  if result.stop_signal is not None:
    return result, None, []
  layout = Layout.build(run.model, run.mesh, run.train)
  params = result.state.params
  short = short_context_loss(
    run,
    tokenizer,
    layout,
    params,
    evaluation.short_seq_len,
    max(1, plan.tokens_per_step // evaluation.short_seq_len),
  )
  lengths = sorted({s.seq_len for s in plan.stages[: index + 1]})
  records = []
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
      records.append({"stage": index, "step": result.last["step"], **record})
  summary = dict(
    stage=index,
    seq_len=stage.seq_len,
    rows=plan.rows(index),
    step=result.last["step"],
    mesh=layout.degrees,
    short_context_loss=short,
    short_seq_len=evaluation.short_seq_len,
    niah={
      str(count): niah.scores_by_length([r for r in records if r["needles"] == count])
      for count in evaluation.needles
    },
  )
  return result, summary, records
