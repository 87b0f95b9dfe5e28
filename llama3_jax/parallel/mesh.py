"""Building the named device mesh from a MeshConfig."""

from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from llama3_jax.config.mesh_config import MESH_AXES, MeshConfig


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with axes (data, fsdp, pipeline, context, tensor), Auto axis types (logical-rule sharding).

  With `dcn_data` > 1 the data axis spans slices and all other axes stay within one slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  cfg = cfg.resolved(len(devices))
  shape = cfg.degrees()
  if cfg.dcn_data > 1:
    ici_shape = (cfg.data // cfg.dcn_data,) + shape[1:]
    dcn_shape = (cfg.dcn_data,) + (1,) * (len(shape) - 1)
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  mesh = Mesh(np.asarray(device_array), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  logging.info("Mesh %s over %d devices", dict(mesh.shape), len(devices))
  return mesh
