"""Generates text from a Llama 3 checkpoint, or from a randomly initialised preset when none is given.

  python experiments/generate.py --config tiny --prompt "The capital of France is"
  python experiments/generate.py --checkpoint /ckpt/Llama3.1-8B-Instruct \
      --chat '[{"role": "user", "content": "Write a haiku about JAX."}]'
"""

import json
import os
import time

import jax
from absl import app, flags, logging

import llama3_jax as l3
from llama3_jax.config.model_config import ATTENTION_IMPLS, DTYPES
from llama3_jax.convert import load_checkpoint

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Meta, Hugging Face or llama3_jax checkpoint dir."
)
_CONFIG = flags.DEFINE_string(
  "config", "tiny", "Preset to initialise randomly when --checkpoint is absent."
)
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Plain-text prompt (repeat for a batch).")
_CHAT = flags.DEFINE_string("chat", None, "A dialog as a JSON list of {role, content} messages.")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "tokenizer.model path (default: the checkpoint's, else llama-models')."
)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES), "Compute dtype override.")
_ATTENTION = flags.DEFINE_enum(
  "attention_impl",
  None,
  list(ATTENTION_IMPLS),
  "Attention implementation override (see ModelConfig; cache calls use flash, not splash).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights and sampling.")


def _load_model():
  overrides = {
    name: flag.value
    for name, flag in (("dtype", _DTYPE), ("attention_impl", _ATTENTION))
    if flag.value
  }
  if _CHECKPOINT.value:
    return load_checkpoint(_CHECKPOINT.value, **overrides)
  cfg = l3.get_config(_CONFIG.value, **overrides)
  logging.info(
    "No --checkpoint: random weights for preset %s (%s parameters)",
    cfg.name,
    f"{l3.count_params(cfg):,}",
  )
  return cfg, l3.init_params(cfg, jax.random.key(_SEED.value))


def _tokenizer():
  """--tokenizer, else the checkpoint's own tokenizer.model (Meta ships one), else llama-models'."""
  path = _TOKENIZER.value
  if not path and _CHECKPOINT.value:
    path = os.path.join(_CHECKPOINT.value, "tokenizer.model")
    path = path if os.path.isfile(path) else None
  return l3.Tokenizer.from_file(path) if path else l3.Tokenizer.default()


def _prompt_tokens(tokenizer):
  if _CHAT.value:
    messages = [l3.Message.from_dict(m) for m in json.loads(_CHAT.value)]
    return [l3.ChatFormat(tokenizer).encode_dialog_prompt(messages)]
  if not _PROMPTS.value:
    raise app.UsageError("Give --prompt (repeatable) or --chat")
  return [tokenizer.encode(p, bos=True, eos=False) for p in _PROMPTS.value]


def main(argv):
  del argv
  tokenizer = _tokenizer()
  cfg, params = _load_model()
  params = jax.device_put(params)
  prompts = _prompt_tokens(tokenizer)
  sampling = l3.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  start = time.perf_counter()
  outputs = l3.generate(
    cfg,
    params,
    prompts,
    max_new_tokens=_MAX_NEW_TOKENS.value,
    sampling=sampling,
    stop_ids=tokenizer.stop_ids,
    rng=jax.random.key(_SEED.value),
  )
  seconds = time.perf_counter() - start
  for prompt, output in zip(prompts, outputs):
    print(f"--- prompt ({len(prompt)} tokens)\n{tokenizer.decode(prompt)}")
    print(f"--- completion ({len(output)} tokens)\n{tokenizer.decode(output)}")
  total = sum(len(o) for o in outputs)
  print(
    f"--- {total} tokens in {seconds:.2f} s including compilation ({total / seconds:.1f} tokens/s)"
  )


if __name__ == "__main__":
  app.run(main)
