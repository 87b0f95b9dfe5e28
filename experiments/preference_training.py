"""Flags and steps shared by the binaries that train on preference JSONL rows {"prompt": [messages],
"chosen": ..., "rejected": ..., "edited"?: ...}: reward.py and dpo.py."""

import os
from typing import Callable, Dict, List, Optional, Tuple

from absl import flags

from llama3_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from llama3_jax.convert import checkpoint_or_preset
from llama3_jax.data.chat import Preference, parse_preference_row, read_jsonl
from llama3_jax.parallel import make_mesh
from llama3_jax.posttrain.trainer import Trainer, epoch_batches, fit, mean_metrics, split_rows
from llama3_jax.train import RunCheckpointer, make_optimizer

CONFIG = flags.DEFINE_string(
  "config", "tiny", "Preset to initialise randomly without a checkpoint."
)
INIT = flags.DEFINE_string(
  "init_checkpoint", None, "Starting weights: ours, a training run's (e.g. SFT) step, HF or Meta."
)
DATA = flags.DEFINE_string("data", None, "Preference JSONL file.", required=True)
HELD_OUT = flags.DEFINE_float("held_out_fraction", 0.1, "Rows kept for held-out metrics.")
MESH = flags.DEFINE_string("mesh", "", "Parallelism degrees, e.g. 'fsdp=2,tensor=2'.")
STEPS = flags.DEFINE_integer("steps", 100, "Training steps.")
BATCH = flags.DEFINE_integer("batch_size", 8, "Preference rows per step.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per row (a prompt and its responses).")
LR = flags.DEFINE_float("lr", 1e-5, "Peak learning rate.")
EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out metrics every N steps.")
CHECKPOINT_DIR = flags.DEFINE_string(
  "checkpoint_dir", None, "Save the train state here every --save_every steps; resume from here."
)
SAVE_EVERY = flags.DEFINE_integer("save_every", 100, "Checkpoint every N steps.")
KEEP = flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
OUTPUT = flags.DEFINE_string("output", None, "Write the trained model here at the end.")
METRICS_FILE = flags.DEFINE_string("metrics_file", None, "Append JSON lines of step metrics here.")
SEED = flags.DEFINE_integer("seed", 0, "Initialisation, split and order.")


def load_model() -> Tuple[ModelConfig, Dict]:
  """(config, float32 params) of --init_checkpoint, or of --config randomly initialised."""
  return checkpoint_or_preset(INIT.value, CONFIG.value, SEED.value, param_dtype="float32")


def preferences() -> Tuple[List[Preference], List[Preference]]:
  """(training, held-out) preferences of --data, split by --seed."""
  return split_rows(list(read_jsonl(DATA.value, parse_preference_row)), HELD_OUT.value, SEED.value)


def make_trainer(boxed: Dict, loss_fn: Callable, mesh=None, frozen=None) -> Trainer:
  """A Trainer of `boxed` (and `frozen` loss inputs) with AdamW (peak --lr, 10% warmup, cosine
  over --steps) on `mesh` or --mesh."""
  optimizer = OptimizerConfig(
    peak_lr=LR.value, warmup_steps=max(1, STEPS.value // 10), decay_steps=STEPS.value + 1
  )
  mesh = mesh or make_mesh(MeshConfig.parse(MESH.value))
  return Trainer(boxed, loss_fn, make_optimizer(optimizer, STEPS.value), mesh, frozen)


def train(
  trainer: Trainer,
  rows: Dict,
  eval_rows: Dict,
  describe: Callable[[Dict], str],
  cfg: ModelConfig,
) -> Tuple[Dict, Dict]:
  """`fit` with the flags: batches of --batch_size `rows` shuffled by --seed, held-out metrics
  averaged over `eval_rows`, checkpoints in --checkpoint_dir (resumed when there), metrics to
  --metrics_file. Returns (start, last) records."""
  checkpointer: Optional[RunCheckpointer] = None
  if CHECKPOINT_DIR.value:
    checkpointer = RunCheckpointer(CHECKPOINT_DIR.value, SAVE_EVERY.value, KEEP.value)
  order = dict(
    data=os.path.abspath(DATA.value),
    held_out_fraction=HELD_OUT.value,
    batch_size=BATCH.value,
    seq_len=SEQ_LEN.value,
    seed=SEED.value,
  )
  try:
    return fit(
      trainer,
      epoch_batches(rows, BATCH.value, SEED.value),
      STEPS.value,
      lambda: mean_metrics(trainer, eval_rows, BATCH.value),
      EVAL_EVERY.value,
      describe,
      cfg,
      checkpointer=checkpointer,
      run_config=order,
      metrics_file=METRICS_FILE.value,
    )
  finally:
    if checkpointer:
      checkpointer.close()
