"""On a machine with a GPU: checks the `gpu_flash` attention kernel against the `xla` reference on
packed rows (documents and padding, grouped-query heads) in float32 and bfloat16, forward and
gradients, then times gpu_flash, flash and xla (forward + backward) side by side:

  python experiments/gpu_check.py --length 4096 --heads 32 --kv_heads 8 --head_dim 128

Without a GPU the kernel runs in Pallas interpret mode (slow; use small shapes), which checks the
numbers but says nothing about speed.
"""

import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import llama3_jax as l3
from llama3_jax.model.attention import attend, choose_impl
from llama3_jax.model.masks import AttentionMask

cli.define("tiles")
FLAGS = flags.FLAGS
_LENGTH = flags.DEFINE_integer("length", 4096, "Tokens per row.")
_ROWS = flags.DEFINE_integer("rows", 2, "Rows (batch).")
_HEADS = flags.DEFINE_integer("heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_TIMED = flags.DEFINE_integer("timed_calls", 5, "Timed calls (median) after one warm-up.")


def _packed_rows(batch: int, length: int, rng):
  """positions, segment ids [B, T]: documents of random lengths, the last ~5% padding."""
  positions = np.zeros((batch, length), np.int32)
  segments = np.zeros((batch, length), np.int32)
  for row in range(batch):
    end = int(length * 0.95)
    cuts = np.sort(rng.choice(np.arange(1, end), 3, replace=False))
    for segment, (a, b) in enumerate(zip([0, *cuts], [*cuts, end]), start=1):
      positions[row, a:b] = np.arange(b - a)
      segments[row, a:b] = segment
  return jnp.asarray(positions), jnp.asarray(segments)


def _cfg(impl: str):
  return l3.get_config("tiny", attention_impl=impl, **cli.model_overrides("attention_block"))


def _grad_fn(impl: str, mask, weights):
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask, _cfg(impl)).astype(jnp.float32) * weights)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_TIMED.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  rng = np.random.RandomState(0)
  b, t, h, g, k = _ROWS.value, _LENGTH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  positions, segments = _packed_rows(b, t, rng)
  mask = AttentionMask.self_attention(positions, segments, index_order=1)
  chosen = choose_impl(_cfg("gpu_flash"), t, t, mask)
  print(f"backend {jax.default_backend()}, gpu_flash resolves to {chosen}")
  real = (segments != 0)[:, :, None, None]
  weights = jnp.asarray(rng.randn(b, t, h, k), jnp.float32) * real
  q32 = jnp.asarray(rng.randn(b, t, h, k), jnp.float32)
  k32, v32 = (jnp.asarray(rng.randn(b, t, g, k), jnp.float32) for _ in range(2))
  forward = lambda impl, *args: attend(*args, mask, _cfg(impl)).astype(jnp.float32) * real
  reference = [forward("xla", q32, k32, v32), *_grad_fn("xla", mask, weights)(q32, k32, v32)[1]]
  for dtype in (jnp.float32, jnp.bfloat16):
    args = [x.astype(dtype) for x in (q32, k32, v32)]
    for impl in ("gpu_flash", "xla"):
      ours = [jax.jit(forward, static_argnums=0)(impl, *args)]
      ours += _grad_fn(impl, mask, weights)(*args)[1]
      errors = [
        float(jnp.mean(jnp.abs(a.astype(jnp.float32) - r))) for a, r in zip(ours, reference)
      ]
      print(
        f"{jnp.dtype(dtype).name:8} {impl:9}: mean |x - float32 xla| out {errors[0]:.2e} dq "
        f"{errors[1]:.2e} dk {errors[2]:.2e} dv {errors[3]:.2e}"
      )
  args = [x.astype(jnp.bfloat16) for x in (q32, k32, v32)]
  seconds = {
    impl: _median_seconds(_grad_fn(impl, mask, weights), *args)
    for impl in ("gpu_flash", "flash", "xla")
  }
  for impl, s in seconds.items():
    print(
      f"bf16 forward + backward, {b} x {t} tokens, {h}/{g} heads: {impl} {s * 1e3:.1f} ms "
      f"({seconds['xla'] / s:.2f}x xla's speed)"
    )


if __name__ == "__main__":
  FLAGS.set_default("attention_block", 128)
  cli.run(main)
