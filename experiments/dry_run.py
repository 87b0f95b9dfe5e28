"""Compiles a preset's train step for a layout on N fake CPU devices, or for a real TPU topology
(`--topology v6e:16x16`, the TPU compiler from libtpu, no chips needed), allocating nothing, and
prints the per-device memory (against the chip's HBM on a TPU topology), the FLOPs per step and
the collectives of the compiled program, beside the closed-form estimate
(train/memory_estimate.py). With --estimate_only nothing is compiled: for layouts too large for
this machine, such as the paper's 405B on 8,192 GPUs:

  python experiments/dry_run.py --config llama3.1-8b --devices 8 --mesh fsdp=4,tensor=2 \\
      --global_batch_size 8 --seq_len 2048 --remat full
  python experiments/dry_run.py --config llama3.1-8b --topology v6e:16x16 --mesh fsdp=256 \\
      --global_batch_size 768 --seq_len 8192 --remat full
  python experiments/dry_run.py --config llama3.1-405b --devices 8192 --estimate_only \\
      --mesh fsdp=64,pipeline=16,tensor=8 --global_batch_size 2048 --seq_len 8192 \\
      --pipeline_micro_batches 16 --pipeline_interleave 2 --attention_impl dot_product
"""

import dataclasses
import os

import cli
import jax
from absl import flags

import llama3_jax as l3
from llama3_jax.config import DataConfig, RunConfig, TrainConfig
from llama3_jax.parallel import abstract_mesh, make_mesh
from llama3_jax.parallel.layout import Layout
from llama3_jax.parallel.mesh import TPU_HBM_GIB, topology_devices
from llama3_jax.train.flops import train_flops_per_token
from llama3_jax.train.memory_estimate import estimated_memory
from llama3_jax.train.plan import GIB, compiled_plan

cli.define("preset", "model", "mesh", "batch", "memory", "schedule")
FLAGS = flags.FLAGS
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for.")
_TOPOLOGY = flags.DEFINE_string(
  "topology", "", "TPU topology to compile for instead, e.g. v5e:2x2 or v6e:16x16 (needs libtpu)."
)
_ESTIMATE_ONLY = flags.DEFINE_bool(
  "estimate_only", False, "Print the closed-form estimate only (no compile, any device count)."
)


def main(argv):
  del argv
  devices = None
  if _TOPOLOGY.value:
    # Compiling touches no chip: let several compiles share libtpu (it locks it otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")
    devices = topology_devices(_TOPOLOGY.value)
  elif not _ESTIMATE_ONLY.value:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  n_devices = len(devices) if devices else _DEVICES.value
  cfg = l3.get_config(
    FLAGS.config, param_dtype="float32", **cli.model_overrides("attention_impl", "dtype", "remat")
  )
  if FLAGS.seq_len > cfg.max_seq_len:  # planning a longer context than the preset's
    print(f"max_seq_len raised from {cfg.max_seq_len} to --seq_len {FLAGS.seq_len}")
    cfg = cfg.replace(max_seq_len=FLAGS.seq_len)
  run = RunConfig(
    model=cfg,
    mesh=cli.mesh_config().resolved(n_devices),
    data=DataConfig(seq_len=FLAGS.seq_len, global_batch_size=FLAGS.global_batch_size),
    train=TrainConfig(
      micro_batches=FLAGS.micro_batches,
      pipeline_micro_batches=FLAGS.pipeline_micro_batches,
      pipeline_interleave=FLAGS.pipeline_interleave,
      loss_chunk=FLAGS.loss_chunk,
    ),
  )
  mesh = (
    abstract_mesh(run.mesh, n_devices) if _ESTIMATE_ONLY.value else make_mesh(run.mesh, devices)
  )
  layout = Layout.build(cfg, mesh, run.train)
  print(
    f"{cfg.name} ({l3.count_params(cfg):,} parameters), mesh {layout.degrees}, batch "
    f"{FLAGS.global_batch_size} x {FLAGS.seq_len}, {FLAGS.micro_batches} micro-batches, "
    f"{cfg.dtype} compute, remat {cfg.remat_policy}, attention {cfg.attention_impl}, "
    + (f"TPU topology {_TOPOLOGY.value} ({devices[0].device_kind})" if devices else "CPU devices")
  )
  if layout.schedule:
    schedule = layout.schedule
    print(
      f"pipeline: {schedule.stages} stages x {schedule.interleave} virtual, "
      f"{schedule.micro_batches} micro-batches, bubble fraction {schedule.bubble_fraction:.3f}"
    )
  try:
    layout.check_layers()
    layout.check_batch(FLAGS.global_batch_size, FLAGS.seq_len)
  except ValueError as e:
    if not _ESTIMATE_ONLY.value:
      raise
    print(f"  NOTE: {e}; estimated regardless (layers rounded up to whole stages)")
  model_flops = train_flops_per_token(cfg, FLAGS.seq_len) * FLAGS.global_batch_size * FLAGS.seq_len
  print(
    f"model FLOPs per step: {model_flops / 1e12:.2f} TFLOP, "
    f"{model_flops / n_devices / 1e12:.2f} TFLOP per device"
  )
  estimate = estimated_memory(layout, run.data)
  print(f"estimated per-device memory: {estimate.plan().summary()}")
  terms = dataclasses.asdict(estimate)
  print("  " + ", ".join(f"{name} {value / GIB:.2f}" for name, value in terms.items()) + " GiB")
  if _ESTIMATE_ONLY.value:
    return
  try:
    memory, collectives = compiled_plan(layout, run.optimizer, run.data)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = next(line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line)
    raise SystemExit(f"does not fit: {message.strip()[:400]}") from None
  print(f"compiled per-device memory: {memory.summary()}")
  if devices:
    hbm = TPU_HBM_GIB.get(devices[0].device_kind)
    if hbm:
      verdict = "fits" if memory.total / GIB <= hbm else "DOES NOT FIT"
      print(f"  against {hbm} GiB HBM per chip: {memory.total / GIB / hbm:.0%}, {verdict}")
  print(f"  state (parameters + Adam moments): {memory.state / GIB:.3f} GiB")
  print(
    f"  temporaries (gradients, activations, gathered weights): {memory.temporaries / GIB:.3f} GiB"
  )
  print(f"estimate / compiled: {estimate.plan().total / memory.total:.3f} (total per device)")
  print(f"collectives: {collectives}")


if __name__ == "__main__":
  for name, default in [
    ("config", "llama3.1-8b"),
    ("seq_len", 2048),
    ("dtype", "bfloat16"),
    ("remat", "full"),
  ]:
    FLAGS.set_default(name, default)
  cli.run(main)
