"""Building the named device mesh from a MeshConfig."""

from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from llama3_jax.config.mesh_config import MESH_AXES, MeshConfig


def axis_degree(axis: str) -> int:
  """The degree of mesh axis `axis` in the mesh being traced under (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def device_grid(cfg: MeshConfig, devices: Sequence) -> np.ndarray:
  """Devices arranged as [data, fsdp, pipeline, context, tensor]; with `dcn_data` > 1 the data axis
  spans slices (devices' `slice_index`) and every other axis stays within one slice."""
  cfg = cfg.resolved(len(devices))
  shape = cfg.degrees()
  if cfg.dcn_data == 1:
    return np.asarray(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True))
  ici_shape = (cfg.data // cfg.dcn_data,) + shape[1:]
  dcn_shape = (cfg.dcn_data,) + (1,) * (len(shape) - 1)
  return np.asarray(mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices))


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with axes (data, fsdp, pipeline, context, tensor) and Auto axis types (logical-rule
  sharding) over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = Mesh(device_grid(cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  logging.info("Mesh %s over %d devices", dict(mesh.shape), len(devices))
  return mesh
