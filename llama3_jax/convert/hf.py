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
from llama3_jax.convert.config_files import ConfigFile, build, read_json_object
from llama3_jax.convert.hf_fp8 import (
  SAFETENSORS_E4M3,
  fp8_config_to_hf,
  fp8_fields_from_hf,
  read_e4m3,
)
from llama3_jax.convert.hf_tokenizer import save_hf_tokenizer
from llama3_jax.convert.layout import (
  assemble_params,
  check_all_used,
  iter_torch_tensors,
  same_bits,
)
from llama3_jax.tokenizer.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Llama 3's stop tokens: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
LLAMA3_BOS_ID, LLAMA3_EOS_IDS = 128000, [128001, 128008, 128009]


def is_hf_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
    f.endswith(".safetensors") for f in os.listdir(path)
  )


def config_from_hf(hf: Dict, source: str = CONFIG_FILE, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face LlamaConfig dict (old `rope_scaling` or new
  `rope_parameters`; an fbgemm_fp8 `quantization_config`) read from the file `source`, which
  every error names with the key."""
  values = ConfigFile(hf, source)
  model_type = values.text("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"{source} has model_type={model_type!r}; expected 'llama'")
  rope = values.section("rope_parameters", "rope_scaling")
  rope_type = rope.text("rope_type", rope.text("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise ValueError(
      f"{source} rope type {rope_type!r} is not supported; expected 'llama3' or none"
    )
  scaling = None
  if rope_type == "llama3":
    scaling = build(
      RopeScaling,
      rope.where,
      factor=rope.number("factor"),
      low_freq_factor=rope.number("low_freq_factor"),
      high_freq_factor=rope.number("high_freq_factor"),
      original_context=rope.count("original_max_position_embeddings"),
    )
  dim, n_heads = values.count("hidden_size"), values.count("num_attention_heads")
  head_dim = values.count("head_dim", dim // n_heads)
  if head_dim * n_heads != dim:
    raise ValueError(f"{source}: head_dim={head_dim} * heads={n_heads} != hidden_size={dim}")
  if values.boolean("attention_bias", False) or values.boolean("mlp_bias", False):
    raise ValueError(f"{source} asks for attention/mlp biases, which Llama 3 does not have")
  fields = dict(
    name=values.text("_name_or_path", "") or "hf-llama",
    vocab_size=values.count("vocab_size"),
    dim=dim,
    n_layers=values.count("num_hidden_layers"),
    n_heads=n_heads,
    n_kv_heads=values.count("num_key_value_heads", n_heads),
    ffn_dim=values.count("intermediate_size"),
    norm_eps=values.number("rms_norm_eps", 1e-5),
    rope_theta=rope.number("rope_theta", values.number("rope_theta", 10_000.0)),
    rope_scaling=scaling,
    tie_embeddings=values.boolean("tie_word_embeddings", False),
    max_seq_len=values.count("max_position_embeddings", 8192),
    **fp8_fields_from_hf(hf, source, values.count("num_hidden_layers")),
  )
  fields.update(overrides)
  return build(ModelConfig, source, **fields)


def _max_positions(cfg: ModelConfig) -> int:
  """max_position_embeddings: the model's max_seq_len, unless RoPE scaling's original context is
  not below it (transformers warns of such a config): then the context the scaling extends to
  (original context x factor). Every config transformers takes without a warning round-trips."""
  scaling = cfg.rope_scaling
  if scaling is None or cfg.max_seq_len > scaling.original_context:
    return cfg.max_seq_len
  return int(scaling.original_context * scaling.factor)


def config_to_hf(cfg: ModelConfig) -> Dict:
  """A LlamaConfig dict in the layout of Meta's published config.json files (fp8 models: that of
  Meta's FP8 release)."""
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
    "max_position_embeddings": _max_positions(cfg),
    "tie_word_embeddings": cfg.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": cfg.param_dtype,
    "bos_token_id": LLAMA3_BOS_ID,
    "eos_token_id": LLAMA3_EOS_IDS,
  }
  if cfg.quantization is not None:
    hf["quantization_config"] = fp8_config_to_hf(cfg)
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
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object (tensor name -> file)")
    return {name: os.path.join(path, str(file)) for name, file in weight_map.items()}
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
  config_file = os.path.join(path, CONFIG_FILE)
  hf_config = read_json_object(config_file)
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
    cfg = config_from_hf(hf_config, config_file, **overrides)

    def read(name: str):
      if handle(name).get_slice(name).get_dtype() == SAFETENSORS_E4M3:
        return read_e4m3(files[name], name)
      return handle(name).get_tensor(name)

    check_all_used(
      cfg,
      files,
      lambda spec: spec.hf_name,
      lambda: same_bits(read(EMBEDDING), read(HEAD)),
      f"Checkpoint {path}",
    )
    params = assemble_params(cfg, lambda spec: read(spec.hf_name), jnp.dtype(cfg.param_dtype))
  logging.info(
    "Loaded Hugging Face checkpoint %s (%d tensors, params %s)", path, len(files), cfg.param_dtype
  )
  return cfg, params


def save_hf(
  path: str,
  cfg: ModelConfig,
  params: Dict,
  max_shard_bytes: Optional[int] = 5 << 30,
  tokenizer: Optional[Tokenizer] = None,
) -> None:
  """Writes config.json and safetensors shards (with an index when there are several) into a new or
  empty directory, all files readable by everyone; and, for a model of the tokenizer's vocabulary
  (default: Llama 3's), the tokenizer (tokenizer.json, tokenizer_config.json with the chat
  template) and generation_config.json, so that `AutoTokenizer` and `pipeline` take the directory."""
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(
      f"Refusing to write a Hugging Face checkpoint into non-empty directory {path}"
    )
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  _save_weights(path, cfg, params, max_shard_bytes)
  tokenizer = tokenizer or Tokenizer.default()
  if tokenizer.vocab_size == cfg.vocab_size:
    save_hf_tokenizer(path, tokenizer, _max_positions(cfg))
  else:
    logging.warning(
      "%s: no tokenizer files (the model's vocabulary has %d tokens, the tokenizer's %d)",
      path,
      cfg.vocab_size,
      tokenizer.vocab_size,
    )
  for name in os.listdir(path):
    os.chmod(os.path.join(path, name), 0o644)


def _save_weights(path: str, cfg: ModelConfig, params: Dict, max_shard_bytes: Optional[int]):
  """The safetensors shards of `params` (with an index when there are several) in `path`."""
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
