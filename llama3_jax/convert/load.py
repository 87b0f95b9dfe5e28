"""One entry point for every checkpoint format: ours (Orbax), Hugging Face, Meta consolidated."""

import os
from typing import Dict, Optional, Tuple

import jax
from absl import logging
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig, get_config
from llama3_jax.convert.hf import is_hf_checkpoint, load_hf
from llama3_jax.convert.meta import is_meta_checkpoint, load_meta
from llama3_jax.convert.orbax_io import (
  is_orbax_checkpoint,
  load_orbax,
  load_run_checkpoint,
  run_step_directory,
)
from llama3_jax.model import init_params
from llama3_jax.parallel import init_sharded_params, shard_params

_MAX_LISTED_FILES = 20


def load_checkpoint(
  path: str,
  rope_scaling_factor: Optional[float] = None,
  mesh: Optional[Mesh] = None,
  **overrides,
) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a checkpoint directory, whichever format it is in: ours (Orbax), a
  training run's checkpoints (a step, or the run's directory for its newest step), Hugging Face
  or Meta consolidated.

  Params are numpy arrays, or with `mesh` arrays placed in their shards (our two Orbax formats
  are read shard by shard; the others are read on the host first). Overrides are ModelConfig
  fields (e.g. `dtype="float32"`); `rope_scaling_factor` applies only to Meta checkpoints, whose
  params.json does not record it.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint path {path} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"Checkpoint path {path} is a file; expected a checkpoint directory")
  if is_orbax_checkpoint(path):
    kind, load = "llama3_jax Orbax", load_orbax
  elif run_step_directory(path):
    kind, load = "training run", load_run_checkpoint
  elif is_hf_checkpoint(path):
    kind, load = "Hugging Face", load_hf
  elif is_meta_checkpoint(path):
    kind, load = "Meta consolidated", load_meta
    overrides["rope_scaling_factor"] = rope_scaling_factor
  else:
    files = sorted(os.listdir(path))
    listed = files[:_MAX_LISTED_FILES] + (["..."] if len(files) > _MAX_LISTED_FILES else [])
    raise ValueError(
      f"{path} is not a recognised checkpoint: found {listed or 'no files'}; expected "
      "llama3_jax_config.json + params/ (ours), state/ + config/ (a training run's step, or "
      "step directories of them), config.json + *.safetensors (Hugging Face) or params.json + "
      "consolidated.NN.pth (Meta)"
    )
  if rope_scaling_factor is not None and load is not load_meta:
    raise ValueError(
      f"rope_scaling_factor applies only to Meta checkpoints; {path} is a {kind} "
      "checkpoint, which records its RoPE scaling (override rope_scaling instead)"
    )
  logging.info("Reading %s as a %s checkpoint", path, kind)
  if load in (load_orbax, load_run_checkpoint):  # read shard by shard
    return load(path, mesh=mesh, **overrides)
  cfg, params = load(path, **overrides)
  return cfg, (params if mesh is None else shard_params(params, cfg, mesh))


def checkpoint_or_preset(
  path: Optional[str], preset: str, seed: int, mesh: Optional[Mesh] = None, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) of the checkpoint at `path`, or of preset `preset` randomly initialised
  with `seed` when `path` is None (small experiments without a download); with `mesh`, the params
  are placed in their shards on it."""
  if path:
    return load_checkpoint(path, mesh=mesh, **overrides)
  cfg = get_config(preset, **overrides)
  logging.info("No checkpoint: random weights for preset %s", preset)
  if mesh is None:
    return cfg, init_params(cfg, jax.random.key(seed))
  return cfg, init_sharded_params(cfg, mesh, jax.random.key(seed))
