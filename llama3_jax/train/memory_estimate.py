"""Closed-form per-device memory of a train step, for layouts too large to compile here.

Each term is a count of bytes per device, derived from the model, the batch and a Layout's degrees
and pipeline schedule alone (the Layout may be of an AbstractMesh: no devices needed):

  state          parameters and the two Adam moments (float32), each split like its parameter.
  gradients      the float32 gradient of every parameter, split like it.
  vocab_grads    the embedding's and the output head's gradients at [vocab / tensor, dim] float32:
                 the gradient of a weight gathered over the batch shards is summed over them at full
                 size before each device keeps its slice (what the compiled programs do).
  activations    what the backward pass keeps per layer (by remat policy) for the layers of one
                 pipeline stage, plus the pipeline's input and output buffers.
  logits         fp32 logits, their softmax and gradient of one loss chunk (`loss_chunk` tokens)
                 of the rows one device scores (split over the pipeline ranks too where the
                 Layout's `head_over_pipeline`).
  layer_working  one layer's weights gathered in the compute dtype and their gradient, and its
                 attention scores and probabilities (fp32, local queries x all keys) with the
                 dense implementations, or a few fp32 score tiles with the block-wise ones.
  pipeline_weights  with a pipeline, the layer weights regrouped by stage, and with interleaving
                 each iteration's selection of a virtual stage's weights, kept for the backward.

`compiled_plan` (plan.py) measures the same quantities from XLA; tests check the two agree.
"""

import dataclasses
import math
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import DataConfig
from llama3_jax.model import param_shapes
from llama3_jax.model.attention import FLASH_MIN_PAIRS
from llama3_jax.parallel.layout import Layout
from llama3_jax.parallel.rules import mesh_axes
from llama3_jax.train.plan import MemoryPlan


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device by term (see the module docstring)."""

  state: float
  batch: float
  gradients: float
  vocab_grads: float
  activations: float
  logits: float
  layer_working: float
  pipeline_weights: float

  def plan(self) -> MemoryPlan:
    temporaries = (
      self.gradients
      + self.vocab_grads
      + self.activations
      + self.logits
      + self.layer_working
      + self.pipeline_weights
    )
    return MemoryPlan(state=self.state, batch=self.batch, temporaries=temporaries)


def _split(names, degrees: Dict[str, int]) -> int:
  return math.prod(degrees[axis] for name in names if name for axis in mesh_axes(name))


def estimated_memory(layout: Layout, data: DataConfig) -> MemoryEstimate:
  """The closed-form estimate of the Layout's train step on `data`'s batches. Attention
  `xla` (and `auto` on short rows) materialises fp32 scores and probabilities; `dot_product` is
  taken to be a fused kernel that does not (cuDNN on GPU; on CPU it falls back to materialising
  them), like the block-wise kernels (flash, splash, gpu_flash)."""
  cfg, train, schedule = layout.model, layout.train, layout.schedule
  degrees = layout.degrees
  tp, cp, pp = degrees["tensor"], layout.context_degree, layout.pipeline_stages
  compute_bytes = jnp.dtype(cfg.dtype).itemsize
  param_bytes = jnp.dtype(cfg.param_dtype).itemsize

  leaves = jax.tree.leaves(
    param_shapes(cfg), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  local_params = sum(leaf.value.size / _split(leaf.names, degrees) for leaf in leaves)
  layer_params = sum(leaf.value.size for leaf in leaves if leaf.names[0] == "layers") / cfg.n_layers

  # Rows of one gradient micro-batch on one device; with a pipeline, a stage runs 1/M of them at
  # a time but keeps what the backward pass needs for all M (and for the bubble's slots).
  rows = data.global_batch_size / train.micro_batches / layout.batch_degree
  in_flight, kept, pipeline_weights = rows, 1.0, 0.0
  if schedule:
    in_flight = rows / schedule.micro_batches
    kept = schedule.iterations / (schedule.interleave * schedule.micro_batches)
    local_layer_params = layer_params * cfg.n_layers / _split(("layers", "embed", "mlp"), degrees)
    pipeline_weights = param_bytes * local_layer_params
    if schedule.interleave > 1:
      pipeline_weights *= 1 + schedule.iterations / schedule.interleave
  length = data.seq_len / cp
  heads = cfg.n_heads / tp
  dense = cfg.attention_impl == "xla" or (
    cfg.attention_impl == "auto" and data.seq_len**2 < FLASH_MIN_PAIRS
  )
  scores = 4 * heads * length * data.seq_len if dense else 0.0
  tile = 0.0 if dense else 3 * 4 * heads * cfg.attention_block_q * cfg.attention_block_kv
  chunk = length if train.loss_chunk <= 0 else min(train.loss_chunk, length)

  token_dim = length * cfg.dim * compute_bytes  # one row of a [rows, T / CP, D] activation
  if cfg.remat_policy == "offload":
    per_row = 0.0  # the layer inputs live in host memory
  elif cfg.remat_policy == "full":
    per_row = token_dim
  elif cfg.remat_policy in ("dots", "dots_with_no_batch_dims"):
    per_row = token_dim * (4 + 3 * cfg.ffn_dim / cfg.dim / tp)
  else:
    per_row = token_dim * (6 + 4 * cfg.ffn_dim / cfg.dim / tp) + scores
  activations = math.ceil(cfg.n_layers / pp) * rows * per_row * kept
  if schedule:
    activations += 2 * rows * token_dim  # the pipeline's input and output buffers

  return MemoryEstimate(
    state=3 * param_bytes * local_params,
    batch=3 * 4 * data.global_batch_size * data.row_len / layout.batch_degree,
    gradients=4 * local_params,
    vocab_grads=(1 if cfg.tie_embeddings else 2) * 4 * cfg.vocab_size * cfg.dim / tp,
    activations=activations,
    logits=3 * 4 * (rows / (pp if layout.head_over_pipeline else 1)) * chunk * cfg.vocab_size / tp,
    layer_working=2 * compute_bytes * layer_params / tp + 2 * in_flight * scores + in_flight * tile,
    pipeline_weights=pipeline_weights,
  )
