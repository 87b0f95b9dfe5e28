"""Ahead-of-time plan of a train step: per-device memory and collectives, without allocating.

`compiled_plan` lowers and compiles the real train step for abstract (shape-only) state and batch
on a mesh and reads XLA's memory and cost analyses.
"""

import collections
import dataclasses
import re
from typing import Dict

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama3_jax.config import RunConfig
from llama3_jax.parallel import batch_sharding, mesh_context
from llama3_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama3_jax.train.train_state import abstract_train_state
from llama3_jax.train.train_step import make_train_step

GIB = 2**30
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device: `state` (parameters + optimizer state, kept between steps), `batch`, and
  `temporaries` (gradients, activations, gathered weights, logits: live only within a step)."""

  state: float
  batch: float
  temporaries: float

  @property
  def total(self) -> float:
    return self.state + self.batch + self.temporaries

  def summary(self) -> str:
    return (
      f"state {self.state / GIB:.2f} GiB + batch {self.batch / GIB:.3f} GiB + temporaries "
      f"{self.temporaries / GIB:.2f} GiB = {self.total / GIB:.2f} GiB per device"
    )


def _abstract_batch(run: RunConfig, mesh: Mesh) -> Dict:
  shape = (run.data.global_batch_size, run.data.row_len)
  sharding = batch_sharding(mesh)
  return {
    k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
    for k in ("tokens", "positions", "segment_ids")
  }


def compiled_plan(run: RunConfig, mesh: Mesh):
  """(MemoryPlan from XLA's memory analysis, {collective: count in the compiled program}) of
  `run`'s train step with the state donated. (XLA's cost analysis counts a scanned layer once, so
  FLOPs come from train/flops.py instead.)"""
  tx = make_optimizer(run.optimizer, run.train.steps)
  state = abstract_train_state(run.model, tx, mesh)
  step = make_train_step(
    run.model, run.train, tx, learning_rate_schedule(run.optimizer, run.train.steps)
  )
  shardings = jax.tree.map(lambda x: x.sharding, state)
  with mesh_context(mesh):
    compiled = (
      jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)
      .lower(state, _abstract_batch(run, mesh))
      .compile()
    )
  memory = compiled.memory_analysis()
  batch_bytes = 3 * 4 * run.data.global_batch_size * run.data.row_len / _batch_shards(mesh)
  plan = MemoryPlan(
    state=memory.argument_size_in_bytes - batch_bytes,
    batch=batch_bytes,
    temporaries=memory.temp_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes,
  )
  text = compiled.as_text()
  collectives = collections.Counter(
    op for op in COLLECTIVES for _ in re.finditer(rf"= [^=]*? {op}(-start)?\(", text)
  )
  return plan, dict(collectives)


def _batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
