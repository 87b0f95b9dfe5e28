"""Trains a reward model (Llama 3 paper Sec. 4.1.2): a language model's backbone and a scalar head
on preference JSONL rows {"prompt": [messages], "chosen": ..., "rejected": ..., "edited"?: ...};
the Bradley-Terry loss over every pair the ranking implies, a prompt and its responses packed in
one row. Prints the held-out pairwise accuracy.

  python experiments/reward.py --init_checkpoint /ckpt/sft --data prefs.jsonl --mesh fsdp=8
"""

import functools
import json
import time

import jax
import numpy as np
from absl import app, flags, logging

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig
from llama3_jax.convert import checkpoint_or_preset
from llama3_jax.data.chat import parse_preference_row, read_jsonl
from llama3_jax.parallel import make_mesh
from llama3_jax.posttrain.reward import (
  RewardModel,
  preference_rows,
  reward_loss,
  reward_params_from_lm,
  save_reward_model,
)
from llama3_jax.posttrain.trainer import (
  Trainer,
  epoch_batches,
  in_batches,
  split_rows,
  with_values,
)
from llama3_jax.train import make_optimizer

_CONFIG = flags.DEFINE_string(
  "config", "tiny", "Preset to initialise randomly without a checkpoint."
)
_INIT = flags.DEFINE_string("init_checkpoint", None, "Backbone weights (Meta, HF or ours).")
_DATA = flags.DEFINE_string("data", None, "Preference JSONL file.", required=True)
_HELD_OUT = flags.DEFINE_float("held_out_fraction", 0.1, "Rows kept for the accuracy.")
_MESH = flags.DEFINE_string("mesh", "", "Parallelism degrees, e.g. 'fsdp=2,tensor=2'.")
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Preference rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per row (a prompt and its responses).")
_LR = flags.DEFINE_float("lr", 1e-5, "Peak learning rate.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out accuracy every N steps.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the trained reward model here.")
_METRICS_FILE = flags.DEFINE_string("metrics_file", None, "JSON lines of step metrics.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, split and order.")


def _held_out_accuracy(trainer: Trainer, rows, size: int) -> float:
  """Mean pairwise accuracy over the held-out rows, in batches of `size` (a remainder is dropped)."""
  accuracies = [float(trainer.evaluate(batch)[1]["accuracy"]) for batch in in_batches(rows, size)]
  return float(np.mean(accuracies))


def main(argv):
  del argv
  chat = l3.ChatFormat(l3.Tokenizer.default())
  cfg, lm_params = checkpoint_or_preset(
    _INIT.value, _CONFIG.value, _SEED.value, param_dtype="float32"
  )
  train_prefs, held_out = split_rows(
    list(read_jsonl(_DATA.value, parse_preference_row)), _HELD_OUT.value, _SEED.value
  )
  train_rows = preference_rows(chat, train_prefs, _SEQ_LEN.value)
  eval_rows = preference_rows(chat, held_out, _SEQ_LEN.value)
  logging.info("%d training and %d held-out preferences", len(train_prefs), len(held_out))

  params = reward_params_from_lm(lm_params, cfg, jax.random.key(_SEED.value + 1))
  boxed = jax.eval_shape(
    lambda: RewardModel(cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
  )
  optimizer = OptimizerConfig(
    peak_lr=_LR.value, warmup_steps=max(1, _STEPS.value // 10), decay_steps=_STEPS.value + 1
  )
  trainer = Trainer(
    with_values(boxed, params),
    functools.partial(reward_loss, cfg=cfg),
    make_optimizer(optimizer, _STEPS.value),
    make_mesh(MeshConfig.parse(_MESH.value)),
  )
  metrics_out = open(_METRICS_FILE.value, "a") if _METRICS_FILE.value else None
  before = _held_out_accuracy(trainer, eval_rows, _BATCH.value)
  logging.info("step 0 | held-out accuracy %.3f", before)
  started = time.perf_counter()
  for step, batch in zip(
    range(1, _STEPS.value + 1), epoch_batches(train_rows, _BATCH.value, _SEED.value)
  ):
    record = {"step": step, **{k: float(v) for k, v in trainer.step(batch).items()}}
    if step % _EVAL_EVERY.value == 0 or step == _STEPS.value:
      record["eval_accuracy"] = _held_out_accuracy(trainer, eval_rows, _BATCH.value)
      logging.info(
        "step %d/%d | loss %.4f | accuracy %.3f | held-out accuracy %.3f | %.1fs",
        step,
        _STEPS.value,
        record["loss"],
        record["accuracy"],
        record["eval_accuracy"],
        time.perf_counter() - started,
      )
    if metrics_out:
      metrics_out.write(json.dumps(record) + "\n")
  if _OUTPUT.value:
    save_reward_model(_OUTPUT.value, cfg, trainer.state.params)
    logging.info("Reward model written to %s", _OUTPUT.value)
  print(
    f"held-out pairwise accuracy {before:.3f} before, {record['eval_accuracy']:.3f} after "
    f"{_STEPS.value} steps ({len(held_out)} preferences)"
  )


if __name__ == "__main__":
  app.run(main)
