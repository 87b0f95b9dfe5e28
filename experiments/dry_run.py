"""Compiles a preset's train step for a layout on N fake devices, allocating nothing, and prints the
per-device memory, the FLOPs per step and the collectives of the compiled program.

  python experiments/dry_run.py --config llama3.1-8b --devices 8 --mesh fsdp=4,tensor=2 \\
      --global_batch_size 8 --seq_len 2048 --remat full
"""

import jax
from absl import app, flags

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, RunConfig, TrainConfig
from llama3_jax.parallel import make_mesh
from llama3_jax.train.flops import train_flops_per_token
from llama3_jax.train.plan import GIB, compiled_plan

_CONFIG = flags.DEFINE_string("config", "llama3.1-8b", "Model preset.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for.")
_MESH = flags.DEFINE_string("mesh", "", "Parallelism degrees, e.g. 'fsdp=4,tensor=2'.")
_BATCH = flags.DEFINE_integer("global_batch_size", 8, "Rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
_MICRO = flags.DEFINE_integer("micro_batches", 1, "Gradient accumulation micro-batches.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")
_REMAT = flags.DEFINE_string("remat", "full", "Remat policy: none, full, dots, ...")


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  cfg = l3.get_config(
    _CONFIG.value, param_dtype="float32", dtype=_DTYPE.value, remat_policy=_REMAT.value
  )
  run = RunConfig(
    model=cfg,
    mesh=MeshConfig.parse(_MESH.value),
    data=DataConfig(seq_len=_SEQ_LEN.value, global_batch_size=_BATCH.value),
    train=TrainConfig(micro_batches=_MICRO.value),
  )
  mesh = make_mesh(run.mesh)
  memory, collectives = compiled_plan(run, mesh)
  model_flops = train_flops_per_token(cfg, _SEQ_LEN.value) * _BATCH.value * _SEQ_LEN.value
  print(
    f"{cfg.name} ({l3.count_params(cfg):,} parameters), mesh {dict(mesh.shape)}, batch "
    f"{_BATCH.value} x {_SEQ_LEN.value}, {_MICRO.value} micro-batches, {_DTYPE.value} compute, "
    f"remat {_REMAT.value}"
  )
  print(f"per-device memory: {memory.summary()}")
  print(f"  state (parameters + Adam moments): {memory.state / GIB:.3f} GiB")
  print(
    f"  temporaries (gradients, activations, gathered weights): {memory.temporaries / GIB:.3f} GiB"
  )
  print(
    f"model FLOPs per step: {model_flops / 1e12:.2f} TFLOP, "
    f"{model_flops / mesh.size / 1e12:.2f} TFLOP per device"
  )
  print(f"collectives: {collectives}")


if __name__ == "__main__":
  app.run(main)
