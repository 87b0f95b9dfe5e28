"""Memory and time of attention implementations, side by side in one process:

  python experiments/bench_attention.py --config tiny --lengths 1024,2048,4096,8192,16384 \\
      --impls flash,xla --time_length 4096 --run_length 32768

1. The train step's compiled temporaries (XLA's memory analysis, one device, batch 1, nothing
   allocated) at each length for each implementation, and the growth from one length to the next
   (2.0 when memory is linear in T, 4.0 when quadratic).
2. Wall time of attention's forward + backward (one layer's shapes, float32) at `--time_length`,
   each implementation against the first of `--impls`.
3. With `--run_length`, real train steps of the preset at that length with flash attention and
   the chunked head (the first step compiles; the second is timed).
"""

import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from llama3_jax.model.attention import attend
from llama3_jax.model.masks import AttentionMask
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import create_train_state, learning_rate_schedule, make_optimizer
from llama3_jax.train.plan import GIB, compiled_plan

cli.define("preset", "tiles", "memory", "lengths")
FLAGS = flags.FLAGS
_IMPLS = flags.DEFINE_list("impls", ["flash", "xla"], "Attention implementations to compare.")
_TIME_LENGTH = flags.DEFINE_integer("time_length", 4096, "Row length of the timing (0: none).")
_RUN_LENGTH = flags.DEFINE_integer("run_length", 0, "Run real flash train steps at this length.")


def _cfg(impl: str, max_len: int):
  return l3.get_config(
    FLAGS.config,
    attention_impl=impl,
    max_seq_len=max(max_len, 8192),
    **cli.model_overrides("attention_block", "remat"),
  )


def _one_device_layout(cfg) -> Layout:
  mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
  return Layout.build(cfg, mesh, TrainConfig(loss_chunk=FLAGS.loss_chunk))


def _step_temporaries(impl: str, length: int) -> float:
  layout = _one_device_layout(_cfg(impl, length))
  data = DataConfig(seq_len=length, global_batch_size=1)
  return compiled_plan(layout, OptimizerConfig(), data)[0].temporaries


def _attention_seconds(impl: str, length: int) -> float:
  """Median of 3 timed forward + backward passes of one layer's attention (after one warm-up)."""
  cfg = _cfg(impl, length)
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(1, length, cfg.n_heads, cfg.head_dim), jnp.float32)
  k, v = (
    jnp.asarray(rng.randn(1, length, cfg.n_kv_heads, cfg.head_dim), jnp.float32) for _ in range(2)
  )
  positions = jnp.arange(length)[None]
  mask = AttentionMask.self_attention(positions, jnp.ones_like(positions), index_order=1)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, cfg) ** 2), (0, 1, 2)))
  jax.block_until_ready(grad(q, k, v))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(grad(q, k, v))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _run_steps(length: int) -> None:
  cfg = _cfg("flash", length)
  layout = _one_device_layout(cfg)
  opt = OptimizerConfig(peak_lr=3e-3, warmup_steps=0, decay_steps=10)
  tx = make_optimizer(opt, 10)
  state, _ = create_train_state(cfg, tx, layout.mesh, jax.random.key(0))
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, length + 1))
  batch = {
    "tokens": jnp.asarray(tokens, jnp.int32),
    "positions": jnp.arange(length + 1, dtype=jnp.int32)[None],
    "segment_ids": jnp.ones((1, length + 1), jnp.int32),
  }
  step = layout.jit_train_step(tx, learning_rate_schedule(opt, 10))
  for i in range(2):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    print(
      f"train step {i + 1} at T={length} (flash, loss chunk {FLAGS.loss_chunk}): loss "
      f"{loss:.4f}, {time.perf_counter() - start:.1f}s ({'with compile' if i == 0 else 'run'})"
    )


def main(argv):
  del argv
  lengths = [int(n) for n in FLAGS.lengths.split(",") if n.strip()]
  print(
    f"{FLAGS.config}: train step temporaries per device (GiB), batch 1, loss chunk "
    f"{FLAGS.loss_chunk}, tiles {FLAGS.attention_block}"
  )
  print(f"{'T':>7} " + " ".join(f"{impl:>10} {'growth':>7}" for impl in _IMPLS.value))
  previous = {}
  for length in lengths:
    cells = []
    for impl in _IMPLS.value:
      temp = _step_temporaries(impl, length)
      growth = f"{temp / previous[impl]:.2f}" if impl in previous else ""
      previous[impl] = temp
      cells.append(f"{temp / GIB:10.3f} {growth:>7}")
    print(f"{length:7d} " + " ".join(cells), flush=True)
  if _TIME_LENGTH.value:
    seconds = {impl: _attention_seconds(impl, _TIME_LENGTH.value) for impl in _IMPLS.value}
    base = _IMPLS.value[0]
    for impl, s in seconds.items():
      print(
        f"attention forward + backward at T={_TIME_LENGTH.value}: {impl} {s * 1e3:.0f} ms, "
        f"{s / seconds[base]:.2f}x {base}'s time"
      )
  if _RUN_LENGTH.value:
    _run_steps(_RUN_LENGTH.value)


if __name__ == "__main__":
  FLAGS.set_default("attention_block", 512)
  FLAGS.set_default("lengths", "1024,2048,4096,8192,16384")
  cli.run(main)
