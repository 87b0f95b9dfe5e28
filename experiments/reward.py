"""Trains a reward model (Llama 3 paper Sec. 4.1.2): a language model's backbone and a scalar head
on preference JSONL rows {"prompt": [messages], "chosen": ..., "rejected": ..., "edited"?: ...};
the Bradley-Terry loss over every pair the ranking implies, a prompt and its responses packed in
one row. Prints the held-out pairwise accuracy; --checkpoint_dir saves and resumes the train state,
--output writes the reward model (read by rejection_sample.py, or `l3.load_checkpoint(path,
kind="reward")`).

  python experiments/reward.py --checkpoint /runs/sft --data prefs.jsonl --mesh fsdp=8
"""

import functools

import cli
import jax
import jobs
from absl import flags, logging

import llama3_jax as l3
from llama3_jax.convert import save_orbax
from llama3_jax.data.sources import MalformedCounter
from llama3_jax.model.spec import REWARD, reward_params_from_lm
from llama3_jax.parallel import make_mesh
from llama3_jax.posttrain.reward import preference_rows, reward_loss
from llama3_jax.posttrain.trainer import with_values

cli.define("checkpoint", "preset", "model", "mesh", "batch", "steps", "training", "rows", "output")
cli.required("data")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  jobs.quiet_libraries()
  chat = l3.ChatFormat(l3.Tokenizer.default())
  mesh = make_mesh(cli.mesh_config())
  cfg, lm_params = cli.load_model(mesh, param_dtype="float32")
  bad_rows = MalformedCounter()
  train_prefs, held_out = jobs.read_preferences(bad_rows)
  train_rows = preference_rows(chat, train_prefs, FLAGS.seq_len)
  eval_rows = preference_rows(chat, held_out, FLAGS.seq_len)
  logging.info("%d training and %d held-out preferences", len(train_prefs), len(held_out))

  # The language model's arrays, in their shards, and a new head created in its shard.
  params = reward_params_from_lm(cfg, lm_params, jax.random.key(FLAGS.seed + 1), mesh)
  trainer = jobs.make_trainer(
    with_values(REWARD.param_shapes(cfg), params),
    functools.partial(reward_loss, cfg=cfg),
    cfg,
    mesh,
  )
  shown = ("loss", "accuracy", "eval_accuracy")
  before, after = jobs.fit_preferences(
    trainer, train_rows, eval_rows, shown, cfg, REWARD.kind, bad_rows
  )
  if FLAGS.output:
    save_orbax(FLAGS.output, cfg, trainer.state.params, kind=REWARD.kind)
    logging.info("Reward model written to %s", FLAGS.output)
  print(
    f"held-out pairwise accuracy {before['eval_accuracy']:.3f} at step {before['step']}, "
    f"{after['eval_accuracy']:.3f} at step {after['step']} ({len(held_out)} preferences)"
  )


if __name__ == "__main__":
  for name, default in [("lr", 1e-5), ("seq_len", 512), ("held_out_fraction", 0.1)]:
    FLAGS.set_default(name, default)
  cli.run(main)
