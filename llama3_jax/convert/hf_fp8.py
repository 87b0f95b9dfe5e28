"""Hugging Face's `fbgemm_fp8` layout, the one of Meta's Llama-3.1-405B-Instruct-FP8 release: a
`quantization_config` entry in config.json, and per quantized linear a float8_e4m3fn `weight`
[out, in] with a float32 `weight_scale` [out, 1] in the safetensors files (layout.py maps them).

Our fp8 models quantize exactly what the paper does (the feed-forward projections of every layer
but the first and last), so a checkpoint that converts another set of modules is refused.
"""

import json
import re
import struct
from typing import Dict, List

import jax.numpy as jnp
import numpy as np

from llama3_jax.config import ModelConfig
from llama3_jax.convert.config_files import ConfigFile

QUANT_METHOD = "fbgemm_fp8"
SAFETENSORS_E4M3 = "F8_E4M3"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _linear_modules(n_layers: int) -> Dict[str, bool]:
  """Every linear module of a Llama with `n_layers` layers -> whether our fp8 quantizes it."""
  modules = {}
  for i in range(n_layers):
    for name in _ATTENTION:
      modules[f"model.layers.{i}.self_attn.{name}"] = False
    for name in _MLP:
      modules[f"model.layers.{i}.mlp.{name}"] = 0 < i < n_layers - 1
  modules["lm_head"] = False
  return modules


def _skipped(module: str, patterns: List[str]) -> bool:
  """Whether `modules_to_not_convert` keeps `module` unquantized, matched as transformers does:
  a pattern (a regular expression) from the start up to a module boundary, or a suffix."""
  boundary = r"(?:(?<=\.)|(?=\.|$))"
  return any(re.match(f"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def fp8_fields_from_hf(hf: Dict, source: str, n_layers: int) -> Dict:
  """The ModelConfig fields of config.json's `quantization_config` (none when absent), checked
  to convert exactly the modules our fp8 quantizes."""
  if hf.get("quantization_config") is None:
    return {}
  quant = ConfigFile(hf, source).section("quantization_config")
  method = quant.text("quant_method")
  if method != QUANT_METHOD:
    raise ValueError(
      f"{quant.where}: quant_method {method!r} is not supported; expected {QUANT_METHOD!r} "
      "(or an unquantized checkpoint)"
    )
  patterns = quant.texts("modules_to_not_convert", [])
  wrong = [
    module
    for module, quantized in _linear_modules(n_layers).items()
    if quantized == _skipped(module, patterns)
  ]
  if wrong:
    raise ValueError(
      f"{quant.where}: modules_to_not_convert does not match the paper's fp8 (the mlp "
      f"projections of layers 1..{n_layers - 2} quantized, nothing else): {len(wrong)} modules "
      f"differ, e.g. {wrong[:4]}"
    )
  return {
    "quantization": "fp8",
    "fp8_activation_scale_ub": quant.number("activation_scale_ub", 1200.0),
  }


def fp8_config_to_hf(cfg: ModelConfig) -> Dict:
  """config.json's `quantization_config` for an fp8 model, listing its unquantized linears."""
  return {
    "quant_method": QUANT_METHOD,
    "activation_scale_ub": cfg.fp8_activation_scale_ub,
    "modules_to_not_convert": [
      module for module, quantized in _linear_modules(cfg.n_layers).items() if not quantized
    ],
  }


def read_e4m3(file: str, name: str) -> np.ndarray:
  """The F8_E4M3 tensor `name` of safetensors `file` (which safetensors' numpy reader cannot
  give), read from the file's header and byte range."""
  with open(file, "rb") as f:
    (header_bytes,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(header_bytes))[name]
    begin, end = entry["data_offsets"]
    f.seek(8 + header_bytes + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, jnp.float8_e4m3fn).reshape(entry["shape"])
