"""Parallelism: the device mesh, the logical-axis rules table and shardings derived from it."""

from llama3_jax.parallel.context import context_degree, load_balanced_order, reorder_for_context
from llama3_jax.parallel.distributed import initialize
from llama3_jax.parallel.mesh import axis_degree, make_mesh
from llama3_jax.parallel.rules import (
  LOGICAL_AXIS_RULES,
  batch_degree,
  check_divisibility,
  mesh_axes,
)
from llama3_jax.parallel.sharding import (
  batch_sharding,
  init_sharded_params,
  logical_shardings,
  mesh_context,
  param_shardings,
  shard_params,
)
from llama3_jax.parallel.pipeline import PipelineSchedule, pipeline_degree, pipeline_hidden
