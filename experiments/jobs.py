"""The jobs several binaries run, from the flags of the vocabulary (cli.py): pretraining
(pretrain.py, sft.py) and training on preference rows (reward.py, dpo.py); and what every
training binary does first (quiet libraries) and last (the exit status of a stopped run)."""

import os
import signal
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cli
import jax
from absl import flags, logging

import llama3_jax as l3
from llama3_jax.config import ModelConfig
from llama3_jax.convert import load_checkpoint
from llama3_jax.data.chat import Preference, parse_preference_row, read_jsonl
from llama3_jax.data.sources import MalformedCounter, expand_pattern
from llama3_jax.parallel import initialize
from llama3_jax.parallel.layout import Layout
from llama3_jax.posttrain.trainer import (
  Trainer,
  epoch_batches,
  mean_metrics,
  split_rows,
)
from llama3_jax.train import RunCheckpointer, make_optimizer
from llama3_jax.train.loop import train_run
from llama3_jax.train.signals import exit_code

FLAGS = flags.FLAGS


def exit_if_stopped(stop_signal, step: int) -> None:
  """Ends the binary with 128 + the signal's number when a signal stopped training early (its
  checkpoint saved)."""
  if stop_signal is not None:
    name = signal.Signals(stop_signal).name
    logging.warning("Stopped by %s after step %d (saved when --checkpoint_dir is set)", name, step)
    sys.exit(exit_code(stop_signal))


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of Orbax and grain; their warnings and errors still show, without the
  tracebacks of their background threads (the error the binary ends with names what failed)."""

  def filter(self, record):
    if not any(part in record.pathname for part in ("/orbax/", "/grain/")):
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno > logging.logging.INFO  # the standard level, not absl's INFO (0)


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


# --- Pretraining and SFT.


def pretraining_main(argv) -> None:
  """pretrain.py's and sft.py's main: join the job, train, draw the curves, continue
  --sample_prompt."""
  del argv
  quiet_libraries()
  initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # progress is logged by process 0
  tokenizer = l3.Tokenizer.default()
  init_params = None
  if FLAGS.checkpoint:
    model_cfg, init_params = load_checkpoint(FLAGS.checkpoint, param_dtype="float32")
  else:
    model_cfg = l3.get_config(FLAGS.config, param_dtype="float32")
  run = cli.run_config(model_cfg)
  logging.info("Model %s: %s parameters", model_cfg.name, f"{l3.count_params(model_cfg):,}")
  result = train_run(run, tokenizer, init_params=init_params, metrics=cli.metrics_outputs())
  cli.plot_run(result.records)
  exit_if_stopped(result.stop_signal, result.last["step"])
  state, step = result.state, result.last["step"]
  if FLAGS.sample_prompt and FLAGS.max_new_tokens and jax.process_index() == 0:
    prompt = tokenizer.encode(FLAGS.sample_prompt, bos=True, eos=False)
    [sample] = l3.generate(
      run.model,
      state.params,
      [prompt],
      max_new_tokens=FLAGS.max_new_tokens,
      stop_ids=tokenizer.stop_ids,
      sampling=l3.SamplingConfig(temperature=FLAGS.sample_temperature, top_p=0.9),
      rng=jax.random.key(FLAGS.seed),
    )
    print(f"--- sample after step {step}\n{FLAGS.sample_prompt}{tokenizer.decode(sample)}")


# --- Training on preference rows (reward.py, dpo.py).


def read_preferences(bad_rows: MalformedCounter) -> Tuple[List[Preference], List[Preference]]:
  """(training, held-out) preferences of the JSONL files of every --data pattern, split by
  --seed; rows skipped by --on_bad_row=skip are counted in `bad_rows`."""
  if any("@" in spec for spec in FLAGS.data):
    raise ValueError(f"--data {FLAGS.data}: preference files take no @WEIGHT")
  paths = [path for spec in FLAGS.data for path in expand_pattern(spec)]
  skip = FLAGS.on_bad_row == "skip"
  rows = [row for path in paths for row in read_jsonl(path, parse_preference_row, skip, bad_rows)]
  if not rows:
    raise ValueError(f"--data {FLAGS.data}: no usable preference rows in {paths}")
  return split_rows(rows, FLAGS.held_out_fraction, FLAGS.seed)


def make_trainer(
  boxed: Dict, loss_fn: Callable, cfg: ModelConfig, mesh, frozen: Optional[Dict] = None
) -> Trainer:
  """A Trainer of `cfg`'s `boxed` parameters (and `frozen` loss inputs) on `mesh`, AdamW
  scheduled by the flags."""
  tx = make_optimizer(cli.optimizer_config(), FLAGS.steps)
  layout = Layout.build(cfg, mesh)
  layout.check_batch(FLAGS.global_batch_size, FLAGS.seq_len)
  return Trainer(boxed, loss_fn, tx, layout, frozen)


def fit_preferences(
  trainer: Trainer,
  rows: Dict,
  eval_rows: Dict,
  shown: Sequence[str],
  cfg: ModelConfig,
  kind: str,
  bad_rows: MalformedCounter,
) -> Tuple[Dict, Dict]:
  """`Trainer.fit` with the flags: batches of --global_batch_size `rows` shuffled by --seed,
  held-out metrics averaged over `eval_rows` at the start and every --eval_every steps,
  checkpoints of a `kind` model in --checkpoint_dir (resumed when there; a resume must keep the
  data, split, batch, length and seed), metrics to --metrics_file, --tensorboard_dir, --wandb_project, curves to --plot_file, with the count of `bad_rows` skipped (`malformed_rows`). Returns (start, last)
  records."""
  settings = cli.checkpoint_config()
  checkpointer = None
  if settings.directory:
    checkpointer = RunCheckpointer(settings.directory, settings.save_every, settings.keep)
  order = dict(
    data=[os.path.abspath(spec) for spec in FLAGS.data],
    held_out_fraction=FLAGS.held_out_fraction,
    batch_size=FLAGS.global_batch_size,
    seq_len=FLAGS.seq_len,
    seed=FLAGS.seed,
  )
  size = FLAGS.global_batch_size
  try:
    first, last = trainer.fit(
      epoch_batches(rows, size, FLAGS.seed),
      cli.fit_policy(eval_at_start=True),
      lambda params: mean_metrics(trainer, eval_rows, size, params),
      shown,
      cfg,
      kind,
      checkpointer=checkpointer,
      run_config=order,
      metrics=cli.metrics_outputs(),
      extras=lambda: {"malformed_rows": bad_rows.total} if bad_rows.total else {},
    )
  finally:
    if checkpointer:
      checkpointer.close()
  cli.plot_run(trainer.records)
  exit_if_stopped(trainer.stop_signal, last["step"])
  return first, last
