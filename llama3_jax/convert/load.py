"""One entry point for every checkpoint format: ours (Orbax), Hugging Face, Meta consolidated."""

import os
from typing import Dict, Optional, Tuple

import jax
from absl import logging

from llama3_jax.config import ModelConfig, get_config
from llama3_jax.convert.hf import is_hf_checkpoint, load_hf
from llama3_jax.convert.meta import is_meta_checkpoint, load_meta
from llama3_jax.convert.orbax_io import is_orbax_checkpoint, load_orbax
from llama3_jax.model import init_params

_MAX_LISTED_FILES = 20


def load_checkpoint(
  path: str, rope_scaling_factor: Optional[float] = None, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a checkpoint directory, whichever of our three formats it is in.

  Overrides are ModelConfig fields (e.g. `dtype="float32"`); `rope_scaling_factor` applies only to
  Meta checkpoints, whose params.json does not record it.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint path {path} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"Checkpoint path {path} is a file; expected a checkpoint directory")
  if is_orbax_checkpoint(path):
    kind, load = "llama3_jax Orbax", load_orbax
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
      "llama3_jax_config.json + params/ (ours), config.json + *.safetensors (Hugging Face) or "
      "params.json + consolidated.NN.pth (Meta)"
    )
  if rope_scaling_factor is not None and load is not load_meta:
    raise ValueError(
      f"rope_scaling_factor applies only to Meta checkpoints; {path} is a {kind} "
      "checkpoint, which records its RoPE scaling (override rope_scaling instead)"
    )
  logging.info("Reading %s as a %s checkpoint", path, kind)
  return load(path, **overrides)


def checkpoint_or_preset(
  path: Optional[str], preset: str, seed: int, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) of the checkpoint at `path`, or of preset `preset` randomly initialised
  with `seed` when `path` is None (small experiments without a download)."""
  if path:
    return load_checkpoint(path, **overrides)
  cfg = get_config(preset, **overrides)
  logging.info("No checkpoint: random weights for preset %s", preset)
  return cfg, init_params(cfg, jax.random.key(seed))
