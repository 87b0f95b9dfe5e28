"""Ahead-of-time plan of a train step: per-device memory and collectives, without allocating.

`compiled_plan` lowers and compiles a Layout's real train step for abstract (shape-only) state and
batch on its mesh and reads XLA's memory and cost analyses.
"""

import collections
import dataclasses
import re
from typing import TYPE_CHECKING, Dict

import jax
import jax.numpy as jnp

from llama3_jax.config import DataConfig, OptimizerConfig
from llama3_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama3_jax.train.train_state import abstract_train_state

if TYPE_CHECKING:
  from llama3_jax.parallel.layout import Layout

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


def _abstract_batch(layout: "Layout", data: DataConfig) -> Dict:
  shape = (data.global_batch_size, data.row_len)
  return {
    k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=layout.batch_sharding)
    for k in ("tokens", "positions", "segment_ids")
  }


def compiled_plan(layout: "Layout", optimizer: OptimizerConfig, data: DataConfig):
  """(MemoryPlan from XLA's memory analysis, {collective: count in the compiled program}) of the
  Layout's train step with `optimizer` on `data`'s batches, the state donated; the batch shape is
  checked against the Layout first. (XLA's cost analysis counts a scanned layer once, so FLOPs
  come from train/flops.py instead.)"""
  layout.check_batch(data.global_batch_size, data.seq_len)
  steps = layout.train.steps
  tx = make_optimizer(optimizer, steps)
  state = abstract_train_state(layout.model, tx, layout.mesh)
  step = layout.jit_train_step(tx, learning_rate_schedule(optimizer, steps))
  compiled = step.lower(state, _abstract_batch(layout, data)).compile()
  memory = compiled.memory_analysis()
  batch_bytes = 3 * 4 * data.global_batch_size * data.row_len / layout.batch_degree
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
