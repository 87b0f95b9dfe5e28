"""Quantizing a language model's parameters for serving, as the paper does (Sec. 6.2): the
feed-forward weights of every layer but the first and the last to e4m3 with one float32 scale per
output channel (`ModelConfig.quantization="fp8"`, model/fp8.py)."""

from typing import Dict, Optional, Tuple

import jax
from absl import logging
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.model import fp8
from llama3_jax.model.spec import LM

FFN_WEIGHTS = ("w1", "w3", "w2")


def _quantized_layers(layers: Dict) -> Dict:
  """A stack of layers [L, ...] with its feed-forward weights [L, in, out] as e4m3 values and
  [L, out] scales (each output channel's max |w| over the inputs maps to 448)."""
  feed_forward = {}
  for name in FFN_WEIGHTS:
    values, scales = fp8.quantize_rows(layers["feed_forward"][name], axis=-2)
    feed_forward[name], feed_forward[f"{name}_scale"] = values, scales
  return {**layers, "feed_forward": feed_forward}


def _split_and_quantize(params: Dict, fp8_cfg: ModelConfig) -> Dict:
  """The one `layers` stack cut into the fp8 config's segments, the fp8 ones quantized."""
  out = {name: value for name, value in params.items() if name != "layers"}
  for segment in fp8_cfg.layer_segments():
    stack = jax.tree.map(
      lambda w: w[segment.start : segment.start + segment.count], params["layers"]
    )
    out[segment.name] = _quantized_layers(stack) if segment.fp8 else stack
  return out


def quantize_params(
  cfg: ModelConfig, params: Dict, mesh: Optional[Mesh] = None
) -> Tuple[ModelConfig, Dict]:
  """(fp8 config, fp8 params) of an unquantized language model (host or device arrays). The
  parameters other than the quantized feed-forward weights are the same values; with `mesh`, the
  result is placed in its shards (the quantized weights keep the originals' logical axes, their
  scales the output axis)."""
  if cfg.quantization is not None:
    raise ValueError(f"The model {cfg.name} is already quantized ({cfg.quantization})")
  fp8_cfg = cfg.replace(quantization="fp8")  # checks that there are layers to quantize
  LM.check(cfg, params, "The params to quantize")
  if mesh is not None and mesh.shape["pipeline"] > 1:
    raise ValueError(
      f"An fp8 model keeps its first and last layers apart from the others, so it runs without "
      f"pipeline stages: quantize {cfg.name} on a mesh without `pipeline` (got {dict(mesh.shape)})"
    )
  if mesh is None:
    quantized = jax.jit(_split_and_quantize, static_argnums=1)(params, fp8_cfg)
  else:
    params = LM.shard(cfg, params, mesh)
    quantized = jax.jit(
      _split_and_quantize, static_argnums=1, out_shardings=LM.shardings(fp8_cfg, mesh)
    )(params, fp8_cfg)
  logging.info(
    "Quantized the feed-forward weights of layers 1..%d of %s to fp8", cfg.n_layers - 2, cfg.name
  )
  return fp8_cfg, quantized
