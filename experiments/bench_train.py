"""Train-step throughput against Hugging Face LlamaForCausalLM + torch AdamW on the same config.

  python experiments/bench_train.py --config llama3-100m --global_batch_size 4 --seq_len 256

Reports tokens/s and achieved model TFLOP/s of both (median step), their ratio, the fraction of
this machine's float32 matmul FLOP/s (best of 10, measured in the same run) each achieves, and the
speed-up over HF a step at that peak would give: the ceiling for any implementation here.
"""

import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import flags
from transformers import LlamaConfig, LlamaForCausalLM

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig, TrainConfig
from llama3_jax.convert.hf import config_to_hf
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import create_train_state, learning_rate_schedule, make_optimizer
from llama3_jax.train.flops import train_flops_per_token

cli.define("preset", "batch")
FLAGS = flags.FLAGS
_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps after 2 warm-up steps.")
_MATMUL = flags.DEFINE_integer(
  "matmul_size", 2048, "Side of the square matmul measuring peak FLOP/s."
)


def _seconds_per_call(fn, steps: int) -> float:
  """Median wall seconds of `steps` calls after 2 warm-up calls (robust to a noisy neighbour)."""
  for _ in range(2):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _matmul_tflops(n: int) -> float:
  """The best of 10 timed [n, n] x [n, n] float32 matmuls, in TFLOP/s."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(10):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e12


def _ours(cfg, tokens) -> float:
  layout = Layout.build(cfg, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]), TrainConfig())
  opt = OptimizerConfig(warmup_steps=10, decay_steps=1000)
  tx = make_optimizer(opt, 1000)
  state, _ = create_train_state(cfg, tx, layout.mesh, jax.random.key(0))
  batch = {
    "tokens": jnp.asarray(tokens),
    "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
    "segment_ids": jnp.ones_like(jnp.asarray(tokens)),
  }
  step = layout.jit_train_step(tx, learning_rate_schedule(opt, 1000))
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  return _seconds_per_call(run, _STEPS.value)


def _hf(cfg, tokens) -> float:
  hf_config = {
    k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "torch_dtype")
  }
  model = LlamaForCausalLM(LlamaConfig(**hf_config, attn_implementation="sdpa")).train()
  optimizer = torch.optim.AdamW(
    model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1
  )
  input_ids = torch.tensor(tokens)

  def run():
    loss = model(input_ids[:, :-1], labels=input_ids[:, :-1]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return _seconds_per_call(run, _STEPS.value)


def main(argv):
  del argv
  cfg = l3.get_config(FLAGS.config, dtype="float32", param_dtype="float32")
  tokens = np.random.RandomState(0).randint(
    0, cfg.vocab_size, (FLAGS.global_batch_size, FLAGS.seq_len + 1)
  )
  tokens_per_step = FLAGS.global_batch_size * FLAGS.seq_len
  flops_per_step = train_flops_per_token(cfg, FLAGS.seq_len) * tokens_per_step
  peak = _matmul_tflops(_MATMUL.value)
  ours, theirs = _ours(cfg, tokens), _hf(cfg, tokens)
  print(
    f"{cfg.name}: {l3.count_params(cfg):,} parameters, batch {FLAGS.global_batch_size} x {FLAGS.seq_len} "
    f"tokens, float32, jax on {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
  )
  print(f"measured float32 matmul peak ({_MATMUL.value}^3, jax): {peak:.3f} TFLOP/s")
  print(f"{'':12} {'tokens/s':>10} {'TFLOP/s':>9} {'of matmul peak':>15}")
  for name, seconds in (("llama3_jax", ours), ("HF + torch", theirs)):
    tflops = flops_per_step / seconds / 1e12
    print(f"{name:12} {tokens_per_step / seconds:10.1f} {tflops:9.3f} {tflops / peak:15.1%}")
  print(f"speed-up over HF: {theirs / ours:.2f}x")
  at_peak = flops_per_step / (peak * 1e12)
  print(
    f"a step running entirely at the matmul peak would take {at_peak:.2f}s: at most "
    f"{theirs / at_peak:.2f}x over HF on this machine"
  )


if __name__ == "__main__":
  FLAGS.set_default("config", "llama3-100m")
  FLAGS.set_default("global_batch_size", 4)
  FLAGS.set_default("seq_len", 256)
  cli.run(main)
