"""Direct Preference Optimization (Llama 3 paper Sec. 4.1.4) on preference JSONL rows
{"prompt": [messages], "chosen": ..., "rejected": ..., "edited"?: ...}: beta 0.1, the responses'
formatting tokens masked, NLL on the chosen response (coefficient 0.2, per token), optional label
smoothing; chosen and rejected scored in one forward pass; the frozen reference's log-probs
precomputed in one pass (default) or computed on the fly (--reference online). --checkpoint_dir
saves and resumes the train state; --output writes the trained policy.

  python experiments/dpo.py --init_checkpoint /runs/sft --data prefs.jsonl --mesh fsdp=8
"""

import functools

import jax
import numpy as np
import preference_training as run
from absl import app, flags

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.convert.orbax_io import save_orbax
from llama3_jax.model import param_shapes
from llama3_jax.parallel import make_mesh, mesh_context, shard_params
from llama3_jax.posttrain.dpo import DPOConfig
from llama3_jax.posttrain.dpo_rows import dpo_objective, dpo_rows, response_logps
from llama3_jax.posttrain.trainer import in_batches, with_values

_BETA = flags.DEFINE_float("beta", 0.1, "DPO beta.")
_NLL = flags.DEFINE_float("nll_weight", 0.2, "Weight of the chosen response's per-token NLL.")
_SMOOTHING = flags.DEFINE_float("label_smoothing", 0.0, "Conservative DPO label smoothing.")
_REFERENCE = flags.DEFINE_enum(
  "reference", "precomputed", ["precomputed", "online"], "Reference log-probs: once, or per step."
)


def _with_reference_logps(rows, params, cfg, mesh, size: int):
  """`rows` plus `ref_chosen` / `ref_rejected` [N] from the frozen reference, in one pass."""
  score = jax.jit(functools.partial(response_logps, cfg=cfg))
  sums = []
  with mesh_context(mesh):
    for batch in in_batches(rows, size):
      sums.append(jax.device_get(score(params, batch)[:2]))
  ref_chosen, ref_rejected = (np.concatenate(parts) for parts in zip(*sums))
  kept = len(ref_chosen)
  return dict(
    {k: v[:kept] for k, v in rows.items()}, ref_chosen=ref_chosen, ref_rejected=ref_rejected
  )


def main(argv):
  del argv
  chat = l3.ChatFormat(l3.Tokenizer.default())
  cfg, params = run.load_model()
  train_prefs, held_out = run.preferences()
  mesh = make_mesh(MeshConfig.parse(run.MESH.value))
  size = run.BATCH.value
  train_rows = dpo_rows(chat, train_prefs, run.SEQ_LEN.value)
  eval_rows = dpo_rows(chat, held_out, run.SEQ_LEN.value)
  dpo_cfg = DPOConfig(beta=_BETA.value, nll_weight=_NLL.value, label_smoothing=_SMOOTHING.value)
  reference = shard_params(params, cfg, mesh)
  if _REFERENCE.value == "online":
    frozen = {"reference_params": reference}
  else:
    frozen = {}
    train_rows, eval_rows = (
      _with_reference_logps(rows, reference, cfg, mesh, size) for rows in (train_rows, eval_rows)
    )
  loss = functools.partial(dpo_objective, cfg=cfg, dpo_cfg=dpo_cfg)
  trainer = run.make_trainer(with_values(param_shapes(cfg), params), loss, mesh, frozen)
  before, after = run.train(
    trainer,
    train_rows,
    eval_rows,
    lambda r: (
      f"loss {r['loss']:.4f} | reward accuracy {r['reward_accuracy']:.3f} | "
      f"held-out margin {r['eval_reward_margin']:.4f}"
    ),
    cfg,
  )
  if run.OUTPUT.value:
    save_orbax(run.OUTPUT.value, cfg, trainer.state.params)
  print(
    f"held-out reward margin {before['eval_reward_margin']:.4f} at step {before['step']}, "
    f"{after['eval_reward_margin']:.4f} at step {after['step']}; reward accuracy "
    f"{before['eval_reward_accuracy']:.3f} -> {after['eval_reward_accuracy']:.3f} "
    f"({len(held_out)} preferences)"
  )


if __name__ == "__main__":
  app.run(main)
