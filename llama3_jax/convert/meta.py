"""Meta "consolidated" Llama checkpoints: params.json + consolidated.NN.pth model-parallel shards.

Shards are read memory-mapped with `torch.load(..., weights_only=True)` (no arbitrary unpickling)
and converted tensor by tensor; torch is imported only when a checkpoint is read.
"""

import os
import pickle
import re
from typing import Dict, List, Optional, Tuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from llama3_jax.config import PRESETS, ModelConfig, RopeScaling, meta_ffn_dim
from llama3_jax.convert.config_files import ConfigFile, build, read_json_object
from llama3_jax.convert.layout import (
  COLUMN_PARALLEL,
  TensorSpec,
  assemble_params,
  check_all_used,
  interleaved_to_half_split,
  same_bits,
  torch_shape,
)

PARAMS_FILE = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")
# Meta's reference `apply_scaling` hard-codes this factor; params.json only says `use_scaled_rope`.
META_DEFAULT_ROPE_FACTOR = 8.0
_UNSUPPORTED_KEYS = (
  "quantization_args",
  "lora_args",
  "vision_chunk_size",
  "vision_max_num_chunks",
  "vision_num_cross_attention_layers",
  "vision_model",
)
_TORCH_DTYPES = {
  "torch.float32": "float32",
  "torch.bfloat16": "bfloat16",
  "torch.float16": "float16",
}


def _shard_files(path: str) -> List[str]:
  """consolidated.00.pth ... consolidated.NN.pth in rank order; numbering must have no gaps."""
  ranks = {}
  for name in os.listdir(path):
    match = _SHARD_RE.fullmatch(name)
    if match:
      ranks[int(match.group(1))] = name
  if not ranks:
    raise FileNotFoundError(
      f"No consolidated.NN.pth shard files in Meta checkpoint directory {path}"
    )
  if sorted(ranks) != list(range(len(ranks))):
    raise ValueError(
      f"Meta checkpoint {path} has shards {sorted(ranks.values())}; expected consolidated.00.pth to "
      f"consolidated.{len(ranks) - 1:02d}.pth with no gaps"
    )
  return [os.path.join(path, ranks[i]) for i in range(len(ranks))]


def is_meta_checkpoint(path: str) -> bool:
  """True for a directory holding Meta's params.json or consolidated.NN.pth files."""
  return os.path.isdir(path) and any(
    name == PARAMS_FILE or _SHARD_RE.fullmatch(name) for name in os.listdir(path)
  )


def _preset_shape(cfg: ModelConfig) -> Tuple:
  return (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_dim)


def config_from_meta(
  params_json: Dict,
  rope_scaling_factor: Optional[float] = None,
  source: str = PARAMS_FILE,
  **overrides,
) -> ModelConfig:
  """ModelConfig from a Meta params.json dict read from the file `source` (named, with the key,
  by every error).

  params.json does not record the RoPE scaling factor, so with `use_scaled_rope` it comes from
  `rope_scaling_factor` if given, else from the scaled-rope preset of the same shape (Llama 3.2
  1B/3B: 32, Llama 3.1: 8), else Meta's reference default of 8. Name, context length and tied
  embeddings also come from that preset when one matches.
  """
  unsupported = sorted(k for k in _UNSUPPORTED_KEYS if k in params_json)
  if unsupported:
    raise ValueError(
      f"{source} has {unsupported}: quantized, LoRA and vision checkpoints are not "
      "supported; expected a dense text model"
    )
  values = ConfigFile(params_json, source)
  dim, n_heads = values.count("dim"), values.count("n_heads")
  n_layers, vocab_size = values.count("n_layers"), values.count("vocab_size")
  n_kv_heads = values.count("n_kv_heads", n_heads)
  ffn_dim = meta_ffn_dim(
    dim, values.number("ffn_dim_multiplier", None), values.count("multiple_of", 256)
  )
  scaled = values.boolean("use_scaled_rope", False)
  shape = (dim, n_layers, n_heads, n_kv_heads, vocab_size, ffn_dim)
  matches = [
    p
    for p in PRESETS.values()
    if _preset_shape(p) == shape and (p.rope_scaling is not None) == scaled
  ]

  scaling = None
  if scaled:
    preset_factors = sorted({p.rope_scaling.factor for p in matches})
    if rope_scaling_factor is not None:
      factor, why = float(rope_scaling_factor), "given explicitly"
    elif len(preset_factors) == 1:
      factor = preset_factors[0]
      why = f"from preset(s) {[p.name for p in matches]} of the same shape"
    else:
      factor = META_DEFAULT_ROPE_FACTOR
      why = (
        f"Meta's reference default; presets of this shape disagree ({preset_factors})"
        if matches
        else "Meta's reference default; no preset has this shape"
      )
    logging.info("Meta checkpoint uses scaled RoPE: factor %s (%s)", factor, why)
    scaling = RopeScaling(factor=factor)
  elif rope_scaling_factor is not None:
    raise ValueError(
      f"rope_scaling_factor={rope_scaling_factor} was given but params.json has no "
      "use_scaled_rope; pass rope_scaling=RopeScaling(...) to force scaling"
    )

  fields = dict(
    name=matches[0].name if len(matches) == 1 else "meta-llama",
    vocab_size=vocab_size,
    dim=dim,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=n_kv_heads,
    ffn_dim=ffn_dim,
    norm_eps=values.number("norm_eps", 1e-5),
    rope_theta=values.number("rope_theta", 500_000.0),
    rope_scaling=scaling,
    tie_embeddings=bool(matches) and all(p.tie_embeddings for p in matches),
    max_seq_len=max(p.max_seq_len for p in matches) if matches else (131_072 if scaled else 8192),
  )
  fields.update(overrides)
  return build(ModelConfig, source, **fields)


def _to_numpy(tensor) -> np.ndarray:
  """A CPU torch tensor as numpy without copying; bfloat16 bits reinterpreted, not rounded."""
  import torch

  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class _Shards:
  """Model-parallel shards of one checkpoint, memory-mapped; `read` reassembles a full tensor."""

  def __init__(self, path: str):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        "Reading Meta .pth checkpoints needs torch: pip install 'llama3_jax[torch]'"
      ) from e
    self.files = _shard_files(path)
    self.state_dicts = []
    for file in self.files:
      try:
        self.state_dicts.append(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
      except pickle.UnpicklingError as e:
        raise ValueError(
          f"Refusing to load {file}: it pickles objects other than tensors, which "
          "could run arbitrary code (read with weights_only=True)"
        ) from e
      except RuntimeError as e:
        raise ValueError(f"Could not read {file} as a torch zip checkpoint: {e}") from e
      if not isinstance(self.state_dicts[-1], dict):
        raise ValueError(
          f"{file} holds a {type(self.state_dicts[-1]).__name__}, expected a state dict"
        )

  def __contains__(self, name: str) -> bool:
    return name in self.state_dicts[0]

  def read(self, name: str, shard_axis: Optional[int]) -> np.ndarray:
    """The full tensor `name`: shards concatenated along `shard_axis`, or shard 0 if replicated."""
    for file, state_dict in zip(self.files, self.state_dicts):
      if name not in state_dict:
        raise ValueError(
          f"Meta checkpoint shard {file} has no tensor {name!r} needed by the config"
        )
      _torch_dtype_name(state_dict[name], name)
    if shard_axis is None or len(self.state_dicts) == 1:
      return _to_numpy(self.state_dicts[0][name])
    return np.concatenate([_to_numpy(sd[name]) for sd in self.state_dicts], axis=shard_axis)


def _torch_dtype_name(tensor, tensor_name: str) -> str:
  name = _TORCH_DTYPES.get(str(tensor.dtype))
  if name is None:
    raise ValueError(
      f"Meta checkpoint tensor {tensor_name!r} is {tensor.dtype}; expected one of "
      f"{sorted(_TORCH_DTYPES)} (quantized checkpoints are not supported)"
    )
  return name


def _embeddings_tied(shards: _Shards, cfg: ModelConfig) -> bool:
  """Whether the checkpoint's output head is the embedding (absent, or bit-identical to it)."""
  if "output.weight" not in shards:
    logging.info("Meta checkpoint has no output.weight: tying the output head to the embedding")
    return True
  if not cfg.tie_embeddings:
    return False
  embedding = shards.read("tok_embeddings.weight", COLUMN_PARALLEL)
  output = shards.read("output.weight", COLUMN_PARALLEL)
  if same_bits(embedding, output):
    return True
  logging.warning(
    "Meta checkpoint output.weight differs from tok_embeddings.weight although the "
    "matching preset ties them: keeping a separate output head"
  )
  return False


def load_meta(
  path: str, rope_scaling_factor: Optional[float] = None, **overrides
) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a Meta consolidated checkpoint directory, converted tensor by tensor.

  `param_dtype` defaults to the checkpoint's dtype; other overrides are ModelConfig fields.
  """
  params_file = os.path.join(path, PARAMS_FILE)
  if not os.path.isfile(params_file):
    raise FileNotFoundError(f"No {PARAMS_FILE} in Meta checkpoint directory {path}")
  params_json = read_json_object(params_file)
  shards = _Shards(path)
  if "tok_embeddings.weight" not in shards:
    raise ValueError(
      f"Meta checkpoint shard {shards.files[0]} has no tensor 'tok_embeddings.weight'"
    )
  overrides.setdefault(
    "param_dtype",
    _torch_dtype_name(shards.state_dicts[0]["tok_embeddings.weight"], "tok_embeddings.weight"),
  )
  cfg = config_from_meta(params_json, rope_scaling_factor, params_file, **overrides)
  if "tie_embeddings" not in overrides:
    cfg = cfg.replace(tie_embeddings=_embeddings_tied(shards, cfg))
  check_all_used(
    cfg,
    shards.state_dicts[0],
    lambda spec: spec.meta_name,
    lambda: same_bits(
      shards.read("tok_embeddings.weight", COLUMN_PARALLEL),
      shards.read("output.weight", COLUMN_PARALLEL),
    ),
    f"Meta checkpoint {path}",
  )

  def read(spec: TensorSpec) -> np.ndarray:
    w = shards.read(spec.meta_name, spec.meta_shard_axis)
    expected = torch_shape(spec, cfg)
    if w.shape != expected:
      raise ValueError(
        f"Meta tensor {spec.meta_name!r} assembled from {len(shards.files)} shard(s) has shape "
        f"{w.shape} but the config ({cfg.name}) expects {expected}"
      )
    if spec.rope:
      w = interleaved_to_half_split(w, cfg.n_heads if spec.path[-1] == "wq" else cfg.n_kv_heads)
    return w

  params = assemble_params(cfg, read, jnp.dtype(cfg.param_dtype))
  logging.info(
    "Loaded Meta checkpoint %s (%d shard(s)) as %s, params %s",
    path,
    len(shards.files),
    cfg.name,
    cfg.param_dtype,
  )
  return cfg, params
