"""Building the named device mesh (or its shape alone) from a MeshConfig."""

from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from llama3_jax.config.mesh_config import MESH_AXES, MeshConfig


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


def abstract_mesh(cfg: MeshConfig, n_devices: int) -> AbstractMesh:
  """The mesh's shape alone, for planning layouts of more devices than this host has (no compile)."""
  return AbstractMesh(
    cfg.resolved(n_devices).degrees(), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


# HBM per chip (GiB) by device kind, for compiles against TPU topologies (dry_run.py).
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` (e.g. 'v5e:2x2', 'v6e:16x16', 'v5p:4x4x4') to compile
  for from any host, without the chips: needs libtpu (`pip install -e ".[tpu-aot]"`)."""
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # libtpu missing or the name unknown: say which
    raise ValueError(
      f"Cannot describe TPU topology {name!r} ({type(e).__name__}: {str(e)[:200]}); it needs "
      'libtpu matching the installed jax (pip install -e ".[tpu-aot]") and a name such as '
      "v5e:2x2, v5p:2x2x2 or v6e:16x16"
    ) from None
