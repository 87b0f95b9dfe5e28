"""Extends a model's context in stages (the paper's 8K -> 128K, Sec. 3.4.2): continued pretraining
on rows of growing length with the global batch in tokens held constant, each stage on its own mesh,
and at each stage's end the held-out loss at a short length (short-context recovery) and
needle-in-a-haystack retrieval at every length reached. Re-running resumes (inside a stage or at
the next); finished stages are not evaluated again.

  python experiments/long_context.py --config tiny --tokens_per_step 4096 \\
      --stage 1024:32768 --stage 4096:32768@fsdp=1,context=2 \\
      --data embedded:packages@0.5:whole --data passkey@0.5 \\
      --checkpoint_dir /tmp/lc_run --output_dir /tmp/lc_eval
  python experiments/long_context.py --checkpoint /ckpt/llama3-8b-pretrained \\
      --mesh fsdp=64,tensor=8 --checkpoint_dir gs://bucket/lc   # the paper's six stages

Writes DIR/stages.jsonl (a summary per stage), DIR/results.jsonl (the NIAH records of every
stage, with its index) and DIR/heatmap.png (the newest stage's NIAH).
"""

import json
import os

import cli
import jax
import jobs
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

import llama3_jax as l3
from llama3_jax.config import PAPER_LONG_CONTEXT, LongContextConfig, LongContextStage
from llama3_jax.convert import load_checkpoint, orbax_io
from llama3_jax.eval import niah
from llama3_jax.parallel import initialize
from llama3_jax.train.long_context import StageEvaluation, stage_runs, train_stage

cli.define(
  "checkpoint",
  "preset",
  "model",
  "tiles",
  "mesh",
  "rows",
  "training",
  "memory",
  "schedule",
  "pretraining",
  "distributed",
  "niah",
)
cli.required("checkpoint_dir", "output_dir")  # the stages connect through checkpoints
FLAGS = flags.FLAGS
_STAGES = flags.DEFINE_multi_string(
  "stage",
  [],
  "A stage, repeatable, in order: SEQ_LEN:TOKENS[@MESH] (MESH as --mesh, default --mesh). "
  "Default: the paper's six stages, 16K to 128K over 800B tokens.",
)
_TOKENS_PER_STEP = flags.DEFINE_integer(
  "tokens_per_step",
  None,
  "Global batch in tokens, the same in every stage (default: the paper's 15,728,640 with its "
  "stages; required with --stage).",
)
_SHORT_SEQ_LEN = flags.DEFINE_integer(
  "short_seq_len",
  None,
  "Row length of the short-context held-out loss (default: the first stage's).",
)
STAGES_FILE = "stages.jsonl"


def _plan() -> LongContextConfig:
  if not _STAGES.value:
    if _TOKENS_PER_STEP.value not in (None, PAPER_LONG_CONTEXT.tokens_per_step):
      raise ValueError("--tokens_per_step other than the paper's needs --stage")
    return PAPER_LONG_CONTEXT
  if _TOKENS_PER_STEP.value is None:
    raise ValueError("--stage needs --tokens_per_step")
  stages = tuple(LongContextStage.parse(spec) for spec in _STAGES.value)
  return LongContextConfig(stages, _TOKENS_PER_STEP.value)


def _model():
  """(model config, initial parameters or None): the run's own when --checkpoint_dir holds a step
  (resuming: --checkpoint is not read again), else --checkpoint's or the --config preset's."""
  if orbax_io.run_steps(FLAGS.checkpoint_dir):
    logging.info("Resuming the run in %s (--checkpoint is not read)", FLAGS.checkpoint_dir)
    return orbax_io.run_model_config(FLAGS.checkpoint_dir), None
  if FLAGS.checkpoint:
    return load_checkpoint(FLAGS.checkpoint, param_dtype="float32")
  return l3.get_config(FLAGS.config, param_dtype="float32"), None


def _evaluated(output_dir: str, stages: int) -> np.ndarray:
  """bool [stages]: which stages DIR/stages.jsonl records as evaluated, as process 0 reads it."""
  done = np.zeros(stages, bool)
  path = os.path.join(output_dir, STAGES_FILE)
  if jax.process_index() == 0 and os.path.exists(path):
    with open(path) as f:
      for record in map(json.loads, filter(str.strip, f)):
        done[record["stage"]] = True
  return np.asarray(multihost_utils.broadcast_one_to_all(done))


def main(argv):
  del argv
  jobs.quiet_libraries()
  initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost)
  plan = _plan()
  model_cfg, init_params = _model()
  if model_cfg.max_seq_len < plan.max_seq_len:
    logging.info("max_seq_len %d -> %d, the longest stage", model_cfg.max_seq_len, plan.max_seq_len)
    model_cfg = model_cfg.replace(max_seq_len=plan.max_seq_len)
  first = plan.stages[0]
  run = cli.run_config(
    model_cfg, steps=plan.total_steps, data=cli.data_config(plan.rows(0), first.seq_len)
  )
  evaluation = StageEvaluation(
    short_seq_len=_SHORT_SEQ_LEN.value or first.seq_len,
    depths=tuple(niah.parse_numbers(FLAGS.depths, "--depths", float)),
    needles=tuple(niah.parse_numbers(FLAGS.needles, "--needles")),
    samples=FLAGS.niah_samples,
    haystack=FLAGS.haystack,
    batch_size=FLAGS.niah_batch_size,
    seed=FLAGS.seed,
  )
  tokenizer = l3.Tokenizer.default()
  runs = stage_runs(run, plan, evaluation, tokenizer)
  output_dir = FLAGS.output_dir
  os.makedirs(output_dir, exist_ok=True)
  evaluated = _evaluated(output_dir, len(plan.stages))
  logging.info(
    "%d stages of %s tokens per step: %s",
    len(plan.stages),
    f"{plan.tokens_per_step:,}",
    "; ".join(
      f"{s.seq_len} x {plan.rows(i)} rows, steps {plan.start_step(i) + 1}-{plan.end_step(i)}"
      for i, s in enumerate(plan.stages)
    ),
  )
  for index, stage in enumerate(plan.stages):
    if evaluated[index]:
      logging.info(
        "Stage %d already trained and evaluated (step %d)", index + 1, plan.end_step(index)
      )
      continue
    result, summary, records = train_stage(
      runs,
      plan,
      index,
      tokenizer,
      evaluation,
      init_params=init_params,
      metrics=cli.metrics_outputs(),
    )
    jobs.exit_if_stopped(result.stop_signal, result.last["step"])
    if summary is None or jax.process_index() > 0:
      continue
    if records:  # the stage's NIAH first, its summary (what marks it evaluated) last
      niah.write_records(records, os.path.join(output_dir, niah.RESULTS_FILE), append=True)
      niah.write_heatmap(
        records,
        os.path.join(output_dir, niah.HEATMAP_FILE),
        f"{model_cfg.name} after stage {index + 1} (step {summary['step']})",
      )
    niah.write_records([summary], os.path.join(output_dir, STAGES_FILE), append=True)
    scores = "; ".join(
      f"{count} needle(s) {niah.summary(records, int(count))}" for count in summary["niah"]
    )
    print(
      f"stage {index + 1}/{len(plan.stages)} ({stage.seq_len} tokens x {plan.rows(index)} rows, "
      f"step {summary['step']}, mesh {summary['mesh']}): short-context loss "
      f"{summary['short_context_loss']:.4f} at {evaluation.short_seq_len} | NIAH {scores}",
      flush=True,
    )
  cli.plot_run(())


if __name__ == "__main__":
  cli.run(main)
