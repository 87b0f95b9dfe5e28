"""Joining a multi-process (multi-host) JAX job: explicit coordinator, or what the launcher set."""

import os
from typing import Optional

import jax
from absl import logging

# Launchers whose environment jax.distributed.initialize() reads without arguments, by a variable
# that marks them. (Cloud TPU pods are detected by jax itself, from the VM metadata.)
_LAUNCHER_VARIABLES = {"SLURM": "SLURM_JOB_ID", "Open MPI": "OMPI_COMM_WORLD_SIZE"}


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  from_environment: bool = False,
) -> None:
  """Connects this process to the others of the job before any other JAX call.

  With `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id` must be
  given too. Without it, `from_environment` (e.g. on a Cloud TPU pod slice) or a SLURM / Open MPI
  environment lets JAX find its peers itself; otherwise this is a single-process run.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
        "A multi-process job needs all of coordinator_address, num_processes and process_id; got "
        f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    launcher = next((n for n, var in _LAUNCHER_VARIABLES.items() if var in os.environ), None)
    if launcher is None and not from_environment:
      return
    logging.info("Joining the %s job described by the environment", launcher or "multi-host")
    jax.distributed.initialize()
  logging.info(
    "Process %d of %d: %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
