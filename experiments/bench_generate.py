"""Decode (and prefill) throughput of our generation against Hugging Face transformers on the same
weights, and against the memory-bandwidth roofline of this machine.

  python experiments/bench_generate.py --config llama3-100m --batch_sizes 1,8 --dtypes float32,bfloat16,fp8

For each dtype and batch size: prefill tokens/s, and decode tokens/s over --max_new_tokens steps
after a --prompt_len prefill (greedy, no stop), ours and Hugging Face's side by side in one
process (best of --repeats after a warm-up). The roofline is the decode rate at which every step
reads the weights it needs (all but the embedding table, unless it is also the head) and the KV
cache's filled slots once, at the copy bandwidth measured here (STREAM convention: bytes read +
written per second). fp8 is the paper's FP8 model (llama3_jax.inference.quantize) of the bf16
weights; Hugging Face's fbgemm_fp8 kernels need a GPU, so its fp8 row compares against HF bf16.
"""

import functools
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
from llama3_jax.inference import SamplingConfig
from llama3_jax.inference.generate import decode_tokens, prefill
from llama3_jax.inference.quantize import quantize_params
from llama3_jax.model import KVCache

cli.define("preset", "generation")
FLAGS = flags.FLAGS
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Rows decoded together, one run each.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16", "fp8"], "float32, bfloat16, fp8.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_HF = flags.DEFINE_bool("hf", True, "Also time Hugging Face transformers.")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": torch.bfloat16}


def _best_seconds(fn, repeats: int) -> float:
  """Best wall time of `fn(start)` after a warm-up; `fn` calls `start()` when its timed part
  begins (untimed set-up before it) and returns once the work is done."""
  times = []
  for _ in range(repeats + 1):
    began = []
    fn(lambda: began.append(time.perf_counter()))
    times.append(time.perf_counter() - began[0])
  return min(times[1:])


def copy_bandwidth(nbytes: int = 2**29, repeats: int = 5) -> float:
  """Bytes read + written per second by a copy of `nbytes` (best of `repeats`)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best


def bytes_per_step(cfg, params, batch: int, cached_tokens: float) -> float:
  """Weights one decode step reads (all but an untied embedding table, of which it reads B rows)
  plus the keys and values of `cached_tokens` filled slots per row."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  weights = sum(
    x.nbytes for path, x in leaves if cfg.tie_embeddings or "embedding" not in str(path)
  )
  kv = 2 * cfg.n_layers * batch * cached_tokens * cfg.n_kv_heads * cfg.head_dim
  return weights + kv * jnp.dtype(cfg.dtype).itemsize


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(cfg, params, tokens_BP, lengths_B, slots):
  return prefill(cfg, params, tokens_BP, lengths_B, KVCache.empty(cfg, tokens_BP.shape[0], slots))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("steps",))
def _decode(cfg, params, logits_BV, cache, lengths_B, *, steps):
  return decode_tokens(
    cfg,
    params,
    logits_BV,
    cache,
    lengths_B,
    jax.random.key(0),
    max_new_tokens=steps,
    sampling=SamplingConfig(),
    stop_ids=(),
  )


def ours(cfg, params, tokens) -> tuple:
  """(prefill seconds, decode seconds for max_new_tokens - 1 steps)."""
  batch, length = tokens.shape
  tokens_j, lengths = jnp.asarray(tokens), jnp.full((batch,), length, jnp.int32)
  steps = FLAGS.max_new_tokens
  slots = length + steps

  def run_prefill(start):
    start()
    jax.block_until_ready(_prefill(cfg, params, tokens_j, lengths, slots))

  def run_decode(start):
    logits, cache = jax.block_until_ready(_prefill(cfg, params, tokens_j, lengths, slots))
    start()
    jax.block_until_ready(_decode(cfg, params, logits, cache, lengths, steps=steps))

  return _best_seconds(run_prefill, _REPEATS.value), _best_seconds(run_decode, _REPEATS.value)


def hugging_face(model, tokens) -> tuple:
  """(prefill seconds, decode seconds for max_new_tokens - 1 steps), greedy with a DynamicCache."""
  input_ids = torch.tensor(tokens)

  def first(start):
    start()
    out = model(input_ids, past_key_values=DynamicCache(), use_cache=True)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

  def run_decode(start):
    cache, token = first(lambda: None)
    start()
    for _ in range(FLAGS.max_new_tokens - 1):
      out = model(token, past_key_values=cache, use_cache=True)
      cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

  with torch.inference_mode():
    return _best_seconds(first, _REPEATS.value), _best_seconds(run_decode, _REPEATS.value)


def models(cfg, params32, hf_dir: str):
  """(dtype, our config, our params, HF model or None) for each --dtypes entry."""
  for dtype in _DTYPES.value:
    base = "bfloat16" if dtype == "fp8" else dtype
    cfg_d = cfg.replace(dtype=base, param_dtype=base)
    params = jax.tree.map(lambda x: x.astype(base), params32)
    if dtype == "fp8":
      cfg_d, params = quantize_params(cfg_d, params)
    hf = None
    if _HF.value:
      hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=_TORCH_DTYPES[dtype]).eval()
    yield dtype, cfg_d, jax.device_put(params), hf


def main(argv):
  del argv
  for dtype in _DTYPES.value:
    if dtype not in _TORCH_DTYPES:
      raise ValueError(f"--dtypes: {dtype!r} is none of {sorted(_TORCH_DTYPES)}")
  cfg = l3.get_config(FLAGS.config, dtype="float32", param_dtype="float32")
  params32 = l3.init_params(cfg, jax.random.key(0))
  bandwidth = copy_bandwidth()
  steps = FLAGS.max_new_tokens - 1
  print(
    f"{cfg.name}: {l3.count_params(cfg):,} parameters; prompt {_PROMPT_LEN.value}, "
    f"{FLAGS.max_new_tokens} new tokens (decode: {steps} steps); jax on "
    f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}; copy bandwidth "
    f"{bandwidth / 1e9:.1f} GB/s"
  )
  header = ("dtype", "batch", "prefill", "HF", "x", "decode", "HF", "x", "roofline", "of roof")
  print("{:9}{:>6}{:>10}{:>9}{:>6}{:>9}{:>8}{:>6}{:>10}{:>9}".format(*header))
  print(f"{'':15}{'tokens/s':>19}{'':6}{'tokens/s':>17}{'':6}{'tokens/s':>10}")
  with tempfile.TemporaryDirectory() as hf_dir:
    save_hf(hf_dir, cfg, params32)
    for dtype, cfg_d, params, hf in models(cfg, params32, hf_dir):
      for batch in map(int, _BATCHES.value):
        tokens = np.random.RandomState(batch).randint(0, cfg.vocab_size, (batch, _PROMPT_LEN.value))
        prefill_s, decode_s = ours(cfg_d, params, tokens)
        hf_prefill_s, hf_decode_s = hugging_face(hf, tokens) if hf else (np.nan, np.nan)
        cached = _PROMPT_LEN.value + steps / 2
        roofline = batch * bandwidth / bytes_per_step(cfg_d, params, batch, cached)
        prefill_rate, decode_rate = batch * _PROMPT_LEN.value / prefill_s, batch * steps / decode_s
        print(
          f"{dtype:9}{batch:6}{prefill_rate:10.0f}{batch * _PROMPT_LEN.value / hf_prefill_s:9.0f}"
          f"{hf_prefill_s / prefill_s:6.2f}{decode_rate:9.1f}{batch * steps / hf_decode_s:8.1f}"
          f"{hf_decode_s / decode_s:6.2f}{roofline:10.1f}{decode_rate / roofline:9.0%}",
          flush=True,
        )


if __name__ == "__main__":
  FLAGS.set_default("config", "llama3-100m")
  FLAGS.set_default("max_new_tokens", 64)
  cli.run(main)
