"""Parallelism: the device mesh, the logical-axis rules table and shardings derived from it. The
`Layout` that decides a run's parallelism once is in parallel/layout.py (import it from there: it
builds on train's step)."""

from llama3_jax.parallel.context import load_balanced_order, reorder_for_context
from llama3_jax.parallel.distributed import initialize
from llama3_jax.parallel.mesh import abstract_mesh, make_mesh
from llama3_jax.parallel.rules import (
  LOGICAL_AXIS_RULES,
  batch_degree,
  check_divisibility,
  mesh_axes,
  mesh_rules,
)
from llama3_jax.parallel.sharding import (
  batch_sharding,
  init_sharded_params,
  logical_shardings,
  mesh_context,
  param_shardings,
  shard_params,
)
from llama3_jax.parallel.pipeline import PipelineSchedule, pipeline_hidden
