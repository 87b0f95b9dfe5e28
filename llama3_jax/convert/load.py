"""One entry point for every checkpoint format (convert/formats.py) and either model kind."""

from typing import Dict, Optional, Tuple

import jax
from absl import logging
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig, get_config
from llama3_jax.convert.formats import FORMATS, detect
from llama3_jax.model import init_params
from llama3_jax.model.spec import LM, spec_of
from llama3_jax.parallel import init_sharded_params


def checkpoint_kind(path: str) -> str:
  """The model kind ("lm", "reward") of the checkpoint at `path`, without reading any array."""
  return detect(path).kind(path)


def load_checkpoint(
  path: str,
  rope_scaling_factor: Optional[float] = None,
  mesh: Optional[Mesh] = None,
  kind: Optional[str] = LM.kind,
  **overrides,
) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a checkpoint directory, whichever format it is in: ours (Orbax), a
  training run's checkpoints (a step, or the run's directory for its newest step), Hugging Face
  or Meta consolidated.

  `kind` is the model kind expected: "lm" (a language model, the default), "reward" (a reward
  model: ours or a reward-model run's), or None for whichever the checkpoint holds
  (`checkpoint_kind` tells which). A checkpoint of another kind is a ValueError naming both,
  raised before any array is read.

  Params are numpy arrays, or with `mesh` arrays placed in their shards (our two Orbax formats
  are read shard by shard; the others are read on the host first). Overrides are ModelConfig
  fields (e.g. `dtype="float32"`); `rope_scaling_factor` applies only to Meta checkpoints, whose
  params.json does not record it.
  """
  if "quantization" in overrides:
    raise ValueError(
      "quantization is not a load override: a checkpoint is quantized or not. Load it as it is "
      "and quantize it with llama3_jax.inference.quantize.quantize_params (or a binary's "
      "--quantize flag)"
    )
  checkpoint_format = detect(path)
  options = {} if rope_scaling_factor is None else {"rope_scaling_factor": rope_scaling_factor}
  for option in options:
    if option not in checkpoint_format.options:
      takers = " or ".join(f.name for f in FORMATS if option in f.options)
      raise ValueError(
        f"{option} applies only to {takers} checkpoints; {path} is a {checkpoint_format.name} "
        "checkpoint, which records its RoPE scaling (override rope_scaling instead)"
      )
  found = spec_of(checkpoint_format.kind(path), f" in {path}")
  if kind is not None and spec_of(kind, " requested") is not found:
    raise ValueError(
      f"{path} holds a {found.description} (kind {found.kind!r}), not the {kind!r} kind asked "
      f"for; pass kind={found.kind!r} (or kind=None for either)"
    )
  logging.info(
    "Reading %s as a %s checkpoint of a %s", path, checkpoint_format.name, found.description
  )
  return checkpoint_format.read(path, mesh=mesh, **options, **overrides)


def checkpoint_or_preset(
  path: Optional[str], preset: str, seed: int, mesh: Optional[Mesh] = None, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) of the language-model checkpoint at `path`, or of preset `preset` randomly
  initialised with `seed` when `path` is None (small experiments without a download); with
  `mesh`, the params are placed in their shards on it."""
  if path:
    return load_checkpoint(path, mesh=mesh, **overrides)
  cfg = get_config(preset, **overrides)
  logging.info("No checkpoint: random weights for preset %s", preset)
  if mesh is None:
    return cfg, init_params(cfg, jax.random.key(seed))
  return cfg, init_sharded_params(cfg, mesh, jax.random.key(seed))
