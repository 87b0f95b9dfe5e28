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
      --pipeline_micro_batches 16 --pipeline_interleave 2 --attention dot_product
"""

import dataclasses
import os

import jax
from absl import app, flags

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, RunConfig, TrainConfig
from llama3_jax.config.mesh_config import MESH_AXES
from llama3_jax.config.model_config import ATTENTION_IMPLS, REMAT_POLICIES
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.mesh import TPU_HBM_GIB, topology_devices
from llama3_jax.train.flops import train_flops_per_token
from llama3_jax.train.memory_estimate import estimated_memory
from llama3_jax.train.plan import GIB, compiled_plan
from llama3_jax.train.train_step import pipeline_schedule

_CONFIG = flags.DEFINE_string("config", "llama3.1-8b", "Model preset.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for.")
_TOPOLOGY = flags.DEFINE_string(
  "topology", "", "TPU topology to compile for instead, e.g. v5e:2x2 or v6e:16x16 (needs libtpu)."
)
_MESH = flags.DEFINE_string("mesh", "", "Parallelism degrees, e.g. 'fsdp=4,tensor=2'.")
_BATCH = flags.DEFINE_integer("global_batch_size", 8, "Rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
_MICRO = flags.DEFINE_integer("micro_batches", 1, "Gradient accumulation micro-batches.")
_PIPELINE_MICRO = flags.DEFINE_integer(
  "pipeline_micro_batches", 0, "Micro-batches in flight through the pipeline (0: stages)."
)
_PIPELINE_INTERLEAVE = flags.DEFINE_integer(
  "pipeline_interleave", 1, "Virtual pipeline stages per device."
)
_ESTIMATE_ONLY = flags.DEFINE_bool(
  "estimate_only", False, "Print the closed-form estimate only (no compile, any device count)."
)
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")
_REMAT = flags.DEFINE_enum("remat", "full", list(REMAT_POLICIES), "Remat policy.")
_ATTENTION = flags.DEFINE_enum(
  "attention", "auto", list(ATTENTION_IMPLS), "Attention implementation (see ModelConfig)."
)
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 1024, "Tokens per row per head/loss chunk.")


def main(argv):
  del argv
  devices = None
  if _TOPOLOGY.value:
    # Compiling touches no chip: let several compiles share libtpu (it locks it otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")
    try:
      devices = topology_devices(_TOPOLOGY.value)
    except ValueError as e:
      raise SystemExit(f"dry_run: {e}") from None
  elif not _ESTIMATE_ONLY.value:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  n_devices = len(devices) if devices else _DEVICES.value
  cfg = l3.get_config(
    _CONFIG.value,
    param_dtype="float32",
    dtype=_DTYPE.value,
    remat_policy=_REMAT.value,
    attention_impl=_ATTENTION.value,
  )
  run = RunConfig(
    model=cfg,
    mesh=MeshConfig.parse(_MESH.value).resolved(n_devices),
    data=DataConfig(seq_len=_SEQ_LEN.value, global_batch_size=_BATCH.value),
    train=TrainConfig(
      micro_batches=_MICRO.value,
      pipeline_micro_batches=_PIPELINE_MICRO.value,
      pipeline_interleave=_PIPELINE_INTERLEAVE.value,
      loss_chunk=_LOSS_CHUNK.value,
    ),
  )
  degrees = dict(zip(MESH_AXES, run.mesh.degrees()))
  print(
    f"{cfg.name} ({l3.count_params(cfg):,} parameters), mesh {degrees}, batch "
    f"{_BATCH.value} x {_SEQ_LEN.value}, {_MICRO.value} micro-batches, {_DTYPE.value} compute, "
    f"remat {_REMAT.value}, attention {_ATTENTION.value}, "
    + (f"TPU topology {_TOPOLOGY.value} ({devices[0].device_kind})" if devices else "CPU devices")
  )
  if run.mesh.pipeline > 1:
    schedule = pipeline_schedule(run.train, run.mesh.pipeline)
    print(
      f"pipeline: {schedule.stages} stages x {schedule.interleave} virtual, "
      f"{schedule.micro_batches} micro-batches, bubble fraction {schedule.bubble_fraction:.3f}"
    )
    try:
      schedule.check(cfg.n_layers, _BATCH.value // _MICRO.value)
    except ValueError as e:
      if not _ESTIMATE_ONLY.value:
        raise
      print(f"  NOTE: {e}; the pipeline needs equal stages, the estimate rounds layers up")
  model_flops = train_flops_per_token(cfg, _SEQ_LEN.value) * _BATCH.value * _SEQ_LEN.value
  print(
    f"model FLOPs per step: {model_flops / 1e12:.2f} TFLOP, "
    f"{model_flops / n_devices / 1e12:.2f} TFLOP per device"
  )
  estimate = estimated_memory(run, run.mesh, n_devices)
  print(f"estimated per-device memory: {estimate.plan().summary()}")
  terms = dataclasses.asdict(estimate)
  print("  " + ", ".join(f"{name} {value / GIB:.2f}" for name, value in terms.items()) + " GiB")
  if _ESTIMATE_ONLY.value:
    return
  try:
    memory, collectives = compiled_plan(run, make_mesh(run.mesh, devices))
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
  app.run(main)
