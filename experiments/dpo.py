"""Direct Preference Optimization (Llama 3 paper Sec. 4.1.4) on preference JSONL rows
{"prompt": [messages], "chosen": ..., "rejected": ..., "edited"?: ...}: beta 0.1, the responses'
formatting tokens masked, NLL on the chosen response (coefficient 0.2, per token), optional label
smoothing; chosen and rejected scored in one forward pass; the frozen reference's log-probs
precomputed in one pass (default) or computed on the fly (--reference online). --checkpoint_dir
saves and resumes the train state; --output writes the trained policy.

  python experiments/dpo.py --checkpoint /runs/sft --data prefs.jsonl --mesh fsdp=8
"""

import functools

import cli
import jobs
from absl import flags

import llama3_jax as l3
from llama3_jax.config import DPOConfig
from llama3_jax.convert import save_orbax
from llama3_jax.data.sources import MalformedCounter
from llama3_jax.model import param_shapes
from llama3_jax.parallel import make_mesh
from llama3_jax.posttrain.dpo_rows import dpo_objective, dpo_rows, with_reference_logps
from llama3_jax.posttrain.trainer import with_values

cli.define("checkpoint", "preset", "model", "mesh", "batch", "steps", "training", "rows", "output")
cli.required("data")
FLAGS = flags.FLAGS
_BETA = flags.DEFINE_float("beta", 0.1, "DPO beta.")
_NLL = flags.DEFINE_float("nll_weight", 0.2, "Weight of the chosen response's per-token NLL.")
_SMOOTHING = flags.DEFINE_float("label_smoothing", 0.0, "Conservative DPO label smoothing.")
_REFERENCE = flags.DEFINE_enum(
  "reference", "precomputed", ["precomputed", "online"], "Reference log-probs: once, or per step."
)


def main(argv):
  del argv
  jobs.quiet_libraries()
  chat = l3.ChatFormat(l3.Tokenizer.default())
  mesh = make_mesh(cli.mesh_config())
  cfg, params = cli.load_model(mesh, param_dtype="float32")  # the reference, and the start
  bad_rows = MalformedCounter()
  train_prefs, held_out = jobs.read_preferences(bad_rows)
  train_rows = dpo_rows(chat, train_prefs, FLAGS.seq_len)
  eval_rows = dpo_rows(chat, held_out, FLAGS.seq_len)
  dpo_cfg = DPOConfig(beta=_BETA.value, nll_weight=_NLL.value, label_smoothing=_SMOOTHING.value)
  if _REFERENCE.value == "online":
    frozen = {"reference_params": params}
  else:
    frozen = {}
    size = FLAGS.global_batch_size
    train_rows, eval_rows = (
      with_reference_logps(rows, params, cfg, mesh, size) for rows in (train_rows, eval_rows)
    )
  loss = functools.partial(dpo_objective, cfg=cfg, dpo_cfg=dpo_cfg)
  trainer = jobs.make_trainer(with_values(param_shapes(cfg), params), loss, cfg, mesh, frozen)
  shown = ("loss", "reward_accuracy", "eval_reward_margin")
  before, after = jobs.fit_preferences(trainer, train_rows, eval_rows, shown, cfg, "lm", bad_rows)
  if FLAGS.output:
    save_orbax(FLAGS.output, cfg, trainer.state.params)
  print(
    f"held-out reward margin {before['eval_reward_margin']:.4f} at step {before['step']}, "
    f"{after['eval_reward_margin']:.4f} at step {after['step']}; reward accuracy "
    f"{before['eval_reward_accuracy']:.3f} -> {after['eval_reward_accuracy']:.3f} "
    f"({len(held_out)} preferences)"
  )


if __name__ == "__main__":
  for name, default in [("lr", 1e-5), ("seq_len", 512), ("held_out_fraction", 0.1)]:
    FLAGS.set_default(name, default)
  cli.run(main)
