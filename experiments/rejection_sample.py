"""Rejection sampling (Llama 3 paper Sec. 4.2.2): for every prompt of a JSONL file, K responses
sampled from the policy (the prompt prefilled once, its KV cache shared by the K samples), scored by
a reward model (experiments/reward.py's --output, its --checkpoint_dir or one step of it). Writes
one JSONL row per prompt to --output: the best response as an SFT dialog {"messages": [...,
assistant], "rewards": [...] (best first)}; and with --pairs_output a preference row {"prompt",
"chosen": best, "rejected": worst} for DPO.

  python experiments/rejection_sample.py --checkpoint /ckpt/sft --reward_model /runs/rm \\
      --prompts prompts.jsonl --samples 8 --output best.jsonl
"""

import json

import cli
import jax
from absl import flags, logging

import llama3_jax as l3
from llama3_jax.convert import load_checkpoint
from llama3_jax.data.chat import parse_prompt_row, read_jsonl
from llama3_jax.model.spec import REWARD
from llama3_jax.parallel import make_mesh, mesh_context
from llama3_jax.parallel.layout import Layout
from llama3_jax.posttrain.rejection import rejection_sample

cli.define(
  "checkpoint",
  "preset",
  "model",
  "mesh",
  "generation",
  "sampling",
  "output",
  "reward_model",
  "rows",
)
cli.required("output", "reward_model")
FLAGS = flags.FLAGS
_PROMPTS = flags.DEFINE_string(
  "prompts", None, 'JSONL of {"prompt": [messages]} (or "messages").', required=True
)
_SAMPLES = flags.DEFINE_integer("samples", 4, "Responses sampled per prompt (K).")
_PAIRS = flags.DEFINE_string(
  "pairs_output", None, "Also write best vs worst preference rows (for DPO) here."
)


def _best_dialog(prompt_rows, scored):
  best = {"role": "assistant", "content": scored[0].text}
  return {"messages": prompt_rows + [best], "rewards": [s.reward for s in scored]}


def _pair(prompt_rows, scored):
  return {"prompt": prompt_rows, "chosen": scored[0].text, "rejected": scored[-1].text}


def main(argv):
  del argv
  chat = l3.ChatFormat(l3.Tokenizer.default())
  mesh = make_mesh(cli.mesh_config())
  cfg, params = cli.load_model(mesh)
  layout = Layout.build(cfg, mesh)
  reward_cfg, reward_params = load_checkpoint(FLAGS.reward_model, mesh=mesh, kind=REWARD.kind)
  sampling = cli.sampling_config()
  rng = jax.random.key(FLAGS.seed)
  pairs = open(_PAIRS.value, "w") if _PAIRS.value else None
  with open(FLAGS.output, "w") as out, mesh_context(mesh):
    for number, prompt in enumerate(
      read_jsonl(_PROMPTS.value, parse_prompt_row, FLAGS.on_bad_row == "skip"), start=1
    ):
      rng, prompt_rng = jax.random.split(rng)
      scored = rejection_sample(
        chat,
        cfg,
        params,
        reward_cfg,
        reward_params,
        prompt,
        samples=_SAMPLES.value,
        max_new_tokens=FLAGS.max_new_tokens,
        sampling=sampling,
        rng=prompt_rng,
        layout=layout,
      )
      as_dicts = [{"role": m.role, "content": m.content} for m in prompt]
      out.write(json.dumps(_best_dialog(as_dicts, scored)) + "\n")
      if pairs:
        pairs.write(json.dumps(_pair(as_dicts, scored)) + "\n")
      logging.info("prompt %d: rewards %s", number, ", ".join(f"{s.reward:.3f}" for s in scored))
  if pairs:
    pairs.close()
  print(f"wrote {number} rows to {FLAGS.output}")


if __name__ == "__main__":
  for name, default in [("temperature", 0.8), ("max_new_tokens", 64)]:
    FLAGS.set_default(name, default)  # diverse samples, whole responses to score
  cli.run(main)
