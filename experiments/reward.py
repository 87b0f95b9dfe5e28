"""Trains a reward model (Llama 3 paper Sec. 4.1.2): a language model's backbone and a scalar head
on preference JSONL rows {"prompt": [messages], "chosen": ..., "rejected": ..., "edited"?: ...};
the Bradley-Terry loss over every pair the ranking implies, a prompt and its responses packed in
one row. Prints the held-out pairwise accuracy; --checkpoint_dir saves and resumes the train state.

  python experiments/reward.py --init_checkpoint /runs/sft --data prefs.jsonl --mesh fsdp=8
"""

import functools

import jax
import numpy as np
import preference_training as run
from absl import app, logging

import llama3_jax as l3
from llama3_jax.posttrain.reward import (
  RewardModel,
  preference_rows,
  reward_loss,
  reward_params_from_lm,
  save_reward_model,
)
from llama3_jax.posttrain.trainer import with_values


def main(argv):
  del argv
  chat = l3.ChatFormat(l3.Tokenizer.default())
  cfg, lm_params = run.load_model()
  train_prefs, held_out = run.preferences()
  train_rows = preference_rows(chat, train_prefs, run.SEQ_LEN.value)
  eval_rows = preference_rows(chat, held_out, run.SEQ_LEN.value)
  logging.info("%d training and %d held-out preferences", len(train_prefs), len(held_out))

  params = reward_params_from_lm(lm_params, cfg, jax.random.key(run.SEED.value + 1))
  boxed = jax.eval_shape(
    lambda: RewardModel(cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
  )
  trainer = run.make_trainer(with_values(boxed, params), functools.partial(reward_loss, cfg=cfg))
  before, after = run.train(
    trainer,
    train_rows,
    eval_rows,
    lambda r: (
      f"loss {r['loss']:.4f} | accuracy {r['accuracy']:.3f} | "
      f"held-out accuracy {r['eval_accuracy']:.3f}"
    ),
    cfg,
  )
  if run.OUTPUT.value:
    save_reward_model(run.OUTPUT.value, cfg, trainer.state.params)
    logging.info("Reward model written to %s", run.OUTPUT.value)
  print(
    f"held-out pairwise accuracy {before['eval_accuracy']:.3f} at step {before['step']}, "
    f"{after['eval_accuracy']:.3f} at step {after['step']} ({len(held_out)} preferences)"
  )


if __name__ == "__main__":
  app.run(main)
