"""The checkpoint formats we read, in one registry: each recognises its directories (`detect`),
names the model kind one holds without reading arrays (`kind`), and reads it (`read(path,
mesh=None, **overrides) -> (config, params)`: numpy params, or params placed in their shards on
`mesh`; formats read on the host are placed after reading). Ours is written by
`orbax_io.save_orbax`."""

import dataclasses
import os
from typing import Callable, Dict, Optional, Tuple

from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.convert.hf import is_hf_checkpoint, load_hf
from llama3_jax.convert.meta import is_meta_checkpoint, load_meta
from llama3_jax.convert.orbax_io import (
  CONFIG_FILE,
  PARAMS_DIR,
  RUN_CONFIG_ITEM,
  RUN_STATE_ITEM,
  is_orbax_checkpoint,
  is_run_checkpoint,
  load_orbax,
  load_run_checkpoint,
  orbax_kind,
  run_kind,
)
from llama3_jax.model.spec import LM

_MAX_LISTED_FILES = 20

Reader = Callable[..., Tuple[ModelConfig, Dict]]


def _language_model(path: str) -> str:
  del path
  return LM.kind


def _on_host(load: Callable[..., Tuple[ModelConfig, Dict]]) -> Reader:
  """A reader of a language-model format that `load`s on the host, then places the params."""

  def read(path: str, mesh: Optional[Mesh] = None, **overrides) -> Tuple[ModelConfig, Dict]:
    cfg, params = load(path, **overrides)
    return cfg, (params if mesh is None else LM.shard(cfg, params, mesh))

  return read


@dataclasses.dataclass(frozen=True)
class Format:
  """`layout` describes the files that `detect` looks for; `options` are the keyword arguments
  `read` takes besides `mesh` and ModelConfig fields."""

  name: str
  layout: str
  detect: Callable[[str], bool]
  read: Reader
  kind: Callable[[str], str] = _language_model
  options: Tuple[str, ...] = ()


ORBAX = Format(
  "llama3_jax Orbax",
  f"{CONFIG_FILE} + {PARAMS_DIR}/ (ours)",
  is_orbax_checkpoint,
  load_orbax,
  orbax_kind,
)
RUN = Format(
  "training run",
  f"{RUN_STATE_ITEM}/ + {RUN_CONFIG_ITEM}/ (a training run's step, or step directories of them)",
  is_run_checkpoint,
  load_run_checkpoint,
  run_kind,
)
HF = Format(
  "Hugging Face", "config.json + *.safetensors (Hugging Face)", is_hf_checkpoint, _on_host(load_hf)
)
META = Format(
  "Meta",
  "params.json + consolidated.NN.pth (Meta consolidated)",
  is_meta_checkpoint,
  _on_host(load_meta),
  options=("rope_scaling_factor",),
)
FORMATS = (ORBAX, RUN, HF, META)  # detection order: the first that recognises a directory


def detect(path: str) -> Format:
  """The format of checkpoint directory `path`; FileNotFoundError if it does not exist,
  ValueError naming the files found and the layouts expected if no format recognises it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint path {path} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"Checkpoint path {path} is a file; expected a checkpoint directory")
  for checkpoint_format in FORMATS:
    if checkpoint_format.detect(path):
      return checkpoint_format
  files = sorted(os.listdir(path))
  listed = files[:_MAX_LISTED_FILES] + (["..."] if len(files) > _MAX_LISTED_FILES else [])
  expected = ", ".join(f.layout for f in FORMATS[:-1]) + f" or {FORMATS[-1].layout}"
  raise ValueError(
    f"{path} is not a recognised checkpoint: found {listed or 'no files'}; expected {expected}"
  )
