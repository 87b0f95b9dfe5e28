"""Prefill and decode throughput of our generation against Hugging Face transformers, same weights.

  python experiments/bench_generate.py --config llama3-100m --batch_size 4 --prompt_len 128 --max_new_tokens 64

Both run greedy on the CPU (or the JAX default device) in float32, side by side in one process;
the best of --repeats timed runs is reported after a warm-up run.
"""

import tempfile
import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import flags
from transformers import DynamicCache, LlamaForCausalLM

import llama3_jax as l3
from llama3_jax.convert import save_hf
from llama3_jax.inference import SamplingConfig, generate_tokens, prefill
from llama3_jax.model import KVCache

cli.define("preset", "generation")
FLAGS = flags.FLAGS
_BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")


def _best_seconds(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _ours(cfg, params, tokens):
  batch, length = tokens.shape
  tokens_j, lengths = jnp.asarray(tokens), jnp.full((batch,), length, jnp.int32)
  prefill_jit = jax.jit(prefill, static_argnums=0)
  cache = KVCache.empty(cfg, batch, length + FLAGS.max_new_tokens)
  prefill_s = _best_seconds(
    lambda: jax.block_until_ready(prefill_jit(cfg, params, tokens_j, lengths, cache)),
    _REPEATS.value,
  )
  total_s = _best_seconds(
    lambda: jax.block_until_ready(
      generate_tokens(
        params,
        tokens_j,
        lengths,
        jax.random.key(0),
        cfg=cfg,
        max_new_tokens=FLAGS.max_new_tokens,
        sampling=SamplingConfig(),
        stop_ids=(),
      )
    ),
    _REPEATS.value,
  )
  return prefill_s, total_s - prefill_s


def _hf(model, tokens):
  input_ids = torch.tensor(tokens)

  def run_prefill():
    return model(input_ids, past_key_values=DynamicCache(), use_cache=True)

  def run_all():
    out = run_prefill()
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(FLAGS.max_new_tokens - 1):
      out = model(token, past_key_values=cache, use_cache=True)
      cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

  with torch.inference_mode():
    prefill_s = _best_seconds(run_prefill, _REPEATS.value)
    total_s = _best_seconds(run_all, _REPEATS.value)
  return prefill_s, total_s - prefill_s


def main(argv):
  del argv
  cfg = l3.get_config(FLAGS.config, dtype="float32", param_dtype="float32")
  params = l3.init_params(cfg, jax.random.key(0))
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (_BATCH.value, _PROMPT_LEN.value))
  with tempfile.TemporaryDirectory() as hf_dir:
    save_hf(hf_dir, cfg, params)
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ours, theirs = _ours(cfg, params, tokens), _hf(hf_model, tokens)
  prefill_tokens = _BATCH.value * _PROMPT_LEN.value
  decode_tokens = _BATCH.value * (FLAGS.max_new_tokens - 1)
  print(
    f"{cfg.name}: {l3.count_params(cfg):,} parameters, batch {_BATCH.value}, prompt "
    f"{_PROMPT_LEN.value}, {FLAGS.max_new_tokens} new tokens, float32, jax on "
    f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
  )
  print(f"{'':8} {'llama3_jax tok/s':>17} {'HF tok/s':>10} {'ratio':>6}")
  for name, count, mine, hf in (
    ("prefill", prefill_tokens, ours[0], theirs[0]),
    ("decode", decode_tokens, ours[1], theirs[1]),
  ):
    print(f"{name:8} {count / mine:17.1f} {count / hf:10.1f} {hf / mine:6.2f}")


if __name__ == "__main__":
  FLAGS.set_default("config", "llama3-100m")
  FLAGS.set_default("max_new_tokens", 64)
  cli.run(main)
