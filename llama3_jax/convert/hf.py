"""Hugging Face Llama checkpoints: config.json + safetensors (single file or sharded with an index)."""

import contextlib
import json
import os
from typing import Dict, Optional, Tuple

import jax.numpy as jnp
import safetensors
import safetensors.numpy
from absl import logging

from llama3_jax.config import ModelConfig, RopeScaling
from llama3_jax.convert.layout import assemble_params, iter_torch_tensors

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING = "model.embed_tokens.weight"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Llama 3's stop tokens: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
LLAMA3_BOS_ID, LLAMA3_EOS_IDS = 128000, [128001, 128008, 128009]


def is_hf_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
    f.endswith(".safetensors") for f in os.listdir(path)
  )


def config_from_hf(hf: Dict, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face LlamaConfig dict (old `rope_scaling` or new `rope_parameters`)."""
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"config.json has model_type={hf['model_type']!r}; expected 'llama'")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise ValueError(
      f"config.json rope type {rope_type!r} is not supported; expected 'llama3' or none"
    )
  scaling = None
  if rope_type == "llama3":
    scaling = RopeScaling(
      factor=float(rope["factor"]),
      low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_context=int(rope["original_max_position_embeddings"]),
    )
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
    raise ValueError(f"config.json head_dim={head_dim} * heads != hidden_size={hf['hidden_size']}")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError("config.json asks for attention/mlp biases, which Llama 3 does not have")
  fields = dict(
    name=hf.get("_name_or_path") or "hf-llama",
    vocab_size=hf["vocab_size"],
    dim=hf["hidden_size"],
    n_layers=hf["num_hidden_layers"],
    n_heads=hf["num_attention_heads"],
    n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
    ffn_dim=hf["intermediate_size"],
    norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
    rope_scaling=scaling,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    max_seq_len=hf.get("max_position_embeddings", 8192),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> Dict:
  """A LlamaConfig dict in the layout of Meta's published config.json files."""
  hf = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.dim,
    "intermediate_size": cfg.ffn_dim,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "max_position_embeddings": cfg.max_seq_len,
    "tie_word_embeddings": cfg.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": cfg.param_dtype,
    "bos_token_id": LLAMA3_BOS_ID,
    "eos_token_id": LLAMA3_EOS_IDS,
  }
  if cfg.rope_scaling is not None:
    hf["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": cfg.rope_scaling.factor,
      "low_freq_factor": cfg.rope_scaling.low_freq_factor,
      "high_freq_factor": cfg.rope_scaling.high_freq_factor,
      "original_max_position_embeddings": cfg.rope_scaling.original_context,
    }
  return hf


def _tensor_files(path: str) -> Dict[str, str]:
  """Tensor name -> safetensors file holding it."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"No .safetensors files in {path}")
  names = {}
  for file in files:
    with safetensors.safe_open(os.path.join(path, file), framework="numpy") as f:
      names.update({name: os.path.join(path, file) for name in f.keys()})
  return names


def load_hf(path: str, **overrides) -> Tuple[ModelConfig, Dict]:
  """(config, params) from a Hugging Face checkpoint directory, read tensor by tensor.

  `param_dtype` defaults to the dtype the tensors are stored in.
  """
  with open(os.path.join(path, CONFIG_FILE)) as f:
    hf_config = json.load(f)
  files = _tensor_files(path)
  with contextlib.ExitStack() as stack:
    handles = {}

    def handle(name: str):
      if name not in files:
        raise ValueError(f"Checkpoint {path} has no tensor {name!r} needed by the config")
      file = files[name]
      if file not in handles:
        if not os.path.isfile(file):
          raise FileNotFoundError(f"Checkpoint index names {file}, which does not exist")
        handles[file] = stack.enter_context(safetensors.safe_open(file, framework="numpy"))
      return handles[file]

    if "param_dtype" not in overrides:
      stored = handle(EMBEDDING).get_slice(EMBEDDING).get_dtype()
      if stored not in _SAFETENSORS_DTYPES:
        raise ValueError(
          f"{EMBEDDING!r} is stored as {stored}; expected one of {sorted(_SAFETENSORS_DTYPES)}"
        )
      overrides["param_dtype"] = _SAFETENSORS_DTYPES[stored]
    cfg = config_from_hf(hf_config, **overrides)
    params = assemble_params(
      cfg, lambda spec: handle(spec.hf_name).get_tensor(spec.hf_name), jnp.dtype(cfg.param_dtype)
    )
  logging.info(
    "Loaded Hugging Face checkpoint %s (%d tensors, params %s)", path, len(files), cfg.param_dtype
  )
  return cfg, params


def save_hf(
  path: str, cfg: ModelConfig, params: Dict, max_shard_bytes: Optional[int] = 5 << 30
) -> None:
  """Writes config.json and safetensors shards (with an index when there are several) into a new or
  empty directory."""
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(
      f"Refusing to write a Hugging Face checkpoint into non-empty directory {path}"
    )
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  shards, current, size = [], {}, 0
  for spec, w in iter_torch_tensors(cfg, params):
    if current and max_shard_bytes and size + w.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[spec.hf_name] = w
    size += w.nbytes
  shards.append(current)
  if len(shards) == 1:
    safetensors.numpy.save_file(
      shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"}
    )
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({tensor: name for tensor in shard})
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
