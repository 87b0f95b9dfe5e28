"""Direct Preference Optimization (Llama 3 paper Sec. 4.1.4) on preference JSONL rows
{"prompt": [messages], "chosen": ..., "rejected": ..., "edited"?: ...}: beta 0.1, the responses'
formatting tokens masked, NLL on the chosen response (coefficient 0.2, per token), optional label
smoothing; chosen and rejected scored in one forward pass; the frozen reference's log-probs
precomputed in one pass (default) or computed on the fly (--reference online).

  python experiments/dpo.py --init_checkpoint /ckpt/sft --data prefs.jsonl --mesh fsdp=8
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
from llama3_jax.convert.orbax_io import save_orbax
from llama3_jax.data.chat import parse_preference_row, read_jsonl
from llama3_jax.model import param_shapes
from llama3_jax.parallel import make_mesh, mesh_context
from llama3_jax.posttrain.dpo import DPOConfig
from llama3_jax.posttrain.dpo_rows import dpo_objective, dpo_rows, response_logps
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
_INIT = flags.DEFINE_string("init_checkpoint", None, "Policy and reference weights.")
_DATA = flags.DEFINE_string("data", None, "Preference JSONL file.", required=True)
_HELD_OUT = flags.DEFINE_float("held_out_fraction", 0.1, "Rows kept for held-out metrics.")
_MESH = flags.DEFINE_string("mesh", "", "Parallelism degrees, e.g. 'fsdp=2,tensor=2'.")
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Preference rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per row (prompt, chosen, rejected).")
_LR = flags.DEFINE_float("lr", 1e-5, "Peak learning rate.")
_BETA = flags.DEFINE_float("beta", 0.1, "DPO beta.")
_NLL = flags.DEFINE_float("nll_weight", 0.2, "Weight of the chosen response's per-token NLL.")
_SMOOTHING = flags.DEFINE_float("label_smoothing", 0.0, "Conservative DPO label smoothing.")
_REFERENCE = flags.DEFINE_enum(
  "reference", "precomputed", ["precomputed", "online"], "Reference log-probs: once, or per step."
)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out metrics every N steps.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the trained policy here (llama3_jax Orbax).")
_METRICS_FILE = flags.DEFINE_string("metrics_file", None, "JSON lines of step metrics.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, split and order.")


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


def _held_out(trainer: Trainer, rows, size: int):
  """Mean held-out metrics over batches of `size`."""
  metrics = [trainer.evaluate(batch)[1] for batch in in_batches(rows, size)]
  return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


def main(argv):
  del argv
  chat = l3.ChatFormat(l3.Tokenizer.default())
  cfg, params = checkpoint_or_preset(_INIT.value, _CONFIG.value, _SEED.value, param_dtype="float32")
  train_prefs, held_out = split_rows(
    list(read_jsonl(_DATA.value, parse_preference_row)), _HELD_OUT.value, _SEED.value
  )
  mesh = make_mesh(MeshConfig.parse(_MESH.value))
  train_rows = dpo_rows(chat, train_prefs, _SEQ_LEN.value)
  eval_rows = dpo_rows(chat, held_out, _SEQ_LEN.value)
  dpo_cfg = DPOConfig(beta=_BETA.value, nll_weight=_NLL.value, label_smoothing=_SMOOTHING.value)
  loss = functools.partial(dpo_objective, cfg=cfg, dpo_cfg=dpo_cfg)
  if _REFERENCE.value == "online":
    loss = functools.partial(loss, reference_params=jax.device_put(params))
  else:
    train_rows = _with_reference_logps(train_rows, params, cfg, mesh, _BATCH.value)
  eval_rows = _with_reference_logps(eval_rows, params, cfg, mesh, _BATCH.value)
  optimizer = OptimizerConfig(
    peak_lr=_LR.value, warmup_steps=max(1, _STEPS.value // 10), decay_steps=_STEPS.value + 1
  )
  trainer = Trainer(
    with_values(param_shapes(cfg), params), loss, make_optimizer(optimizer, _STEPS.value), mesh
  )
  metrics_out = open(_METRICS_FILE.value, "a") if _METRICS_FILE.value else None
  before = _held_out(trainer, eval_rows, _BATCH.value)
  started = time.perf_counter()
  batches = epoch_batches(train_rows, _BATCH.value, _SEED.value)
  for step, batch in zip(range(1, _STEPS.value + 1), batches):
    record = {"step": step, **{k: float(v) for k, v in trainer.step(batch).items()}}
    if step % _EVAL_EVERY.value == 0 or step == _STEPS.value:
      record.update(
        {f"eval_{k}": v for k, v in _held_out(trainer, eval_rows, _BATCH.value).items()}
      )
      logging.info(
        "step %d/%d | loss %.4f | reward accuracy %.3f | held-out margin %.4f | %.1fs",
        step,
        _STEPS.value,
        record["loss"],
        record["reward_accuracy"],
        record["eval_reward_margin"],
        time.perf_counter() - started,
      )
    if metrics_out:
      metrics_out.write(json.dumps(record) + "\n")
  if _OUTPUT.value:
    save_orbax(_OUTPUT.value, cfg, trainer.state.params)
  print(
    f"held-out reward margin {before['reward_margin']:.4f} before, "
    f"{record['eval_reward_margin']:.4f} after; reward accuracy {before['reward_accuracy']:.3f} "
    f"-> {record['eval_reward_accuracy']:.3f} ({len(held_out)} preferences)"
  )


if __name__ == "__main__":
  app.run(main)
