"""The Llama 3 decoder: embedding, scanned decoder layers, final norm and output head."""

from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama3_jax.config import ModelConfig
from llama3_jax.model.attention import Attention
from llama3_jax.model.kv_cache import KVCache
from llama3_jax.model.layers import FeedForward, FP8FeedForward, RMSNorm, declare
from llama3_jax.model.masks import AttentionMask

LAYER_INPUT = "decoder_layer_input"
REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # As full, with each layer's input kept in host memory instead of the accelerator's (TPU/GPU).
  "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[],
    names_which_can_be_offloaded=[LAYER_INPUT],
    offload_src="device",
    offload_dst="pinned_host",
  ),
}
ACT_BTD = ("batch", "length", "act_embed")


class DecoderLayer(nn.Module):
  """Pre-norm attention then pre-norm SwiGLU, each with a residual connection; `fp8`: the
  SwiGLU's weights are quantized (FP8FeedForward)."""

  cfg: ModelConfig
  fp8: bool = False

  @nn.compact
  def __call__(self, carry, layer_index, positions_BT, mask: AttentionMask, cache_index):
    """carry = (x [B, T, D], whole-model cache (k, v) or None); the cache is updated in place."""
    x_BTD, cache_kv = carry
    x_BTD = checkpoint_name(x_BTD, LAYER_INPUT)
    attn_out, cache_kv = Attention(self.cfg, name="attention")(
      RMSNorm(self.cfg, name="attention_norm")(x_BTD),
      positions_BT,
      mask,
      cache_kv,
      layer_index,
      cache_index,
    )
    x_BTD = nn.with_logical_constraint(x_BTD + attn_out, ACT_BTD)
    feed_forward = FP8FeedForward if self.fp8 else FeedForward
    x_BTD = x_BTD + feed_forward(self.cfg, name="feed_forward")(
      RMSNorm(self.cfg, name="ffn_norm")(x_BTD)
    )
    return (nn.with_logical_constraint(x_BTD, ACT_BTD), cache_kv), None


def _scanned_layers(cfg: ModelConfig, n_layers: int):
  """The class of `n_layers` DecoderLayers scanned over a leading `layers` parameter axis."""
  layer = DecoderLayer
  if cfg.remat_policy != "none":
    layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
  return nn.scan(
    layer,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
    length=n_layers,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )


class DecoderStack(nn.Module):
  """`n_layers` consecutive decoder layers: x [B, T, D] -> [B, T, D]; parameters under `layers`
  with a leading axis of `n_layers` (a slice of a Transformer's `layers`: a pipeline stage).
  `context_order`: see Transformer."""

  cfg: ModelConfig
  n_layers: int
  context_order: int = 1

  def setup(self):
    self.layers = _scanned_layers(self.cfg, self.n_layers)(self.cfg)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    """Without a cache: the rows attend within their segments."""
    (x_BTD, _), _ = self.layers(
      (x_BTD, None),
      jnp.arange(self.n_layers),
      positions_BT,
      AttentionMask.self_attention(positions_BT, segment_ids_BT, index_order=self.context_order),
      None,
    )
    return x_BTD

  def with_cache(self, x_BTD, positions_BT, mask: AttentionMask, cache_kv, cache_index):
    """With this stack's cache (k, v) [n_layers, B, S, kv_heads, head_dim], the tokens written
    from slot `cache_index` on and attending as `mask` says: -> (x [B, T, D], cache_kv)."""
    (x_BTD, cache_kv), _ = self.layers(
      (x_BTD, cache_kv), jnp.arange(self.n_layers), positions_BT, mask, cache_index
    )
    return x_BTD, cache_kv


def unrolled_layers(cfg: ModelConfig, params: Dict):
  """A Transformer `run_layers` that runs the decoder layers one by one from per-layer weights,
  sliced from the stacked [L, ...] `params` (a Transformer's) once, here. For a decode loop:
  there a layer scan would copy every layer's weights out of the stack at every step."""
  layers = []
  for segment in cfg.layer_segments():
    stack = params[segment.name]
    for j in range(segment.count):
      weights = jax.tree.map(lambda w: w[j], stack)
      layers.append((segment.start + j, DecoderLayer(cfg, fp8=segment.fp8), weights))

  def run(x_BTD, cache_kv, positions_BT, mask: AttentionMask, cache_index):
    carry = (x_BTD, cache_kv)
    for index, layer, weights in layers:
      carry, _ = layer.apply({"params": weights}, carry, index, positions_BT, mask, cache_index)
    return carry

  return run


def _default_inputs(tokens, positions, segment_ids, *more, start=0):
  """(positions, segment_ids) for [B, T] tokens: checked, or 0..T-1 from `start` and all 1."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  for name, value in zip(
    ("positions", "segment_ids", "branch_ids"), (positions, segment_ids, *more)
  ):
    if value is not None and value.shape != tokens.shape:
      raise ValueError(f"{name} has shape {value.shape}; expected the tokens' shape {tokens.shape}")
  batch, length = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  return positions, segment_ids


class Transformer(nn.Module):
  """tokens [B, T] int -> logits [B, T, vocab] float32.

  positions [B, T] drive RoPE and causality (default: 0..T-1, or from `cache.index` on with a
  cache); segment_ids [B, T] (default all 1) separate packed documents, 0 marks padding. With
  `cache`, the tokens are written into the cache slots from `cache.index` on, attend to every
  filled slot, and (logits, new cache) is returned. `logits_at` [B] int computes logits only at
  that index of each row, returned as [B, vocab]. `branch_ids` [B, T] (no cache) share a
  document's start between branches: a token of branch b > 0 sees branch 0 (the shared part) and
  its own branch only, as if each branch followed the shared part in a row of its own (positions
  continue from the shared part in every branch). `run_layers(x, cache_kv, positions, mask,
  cache_index) -> (x, cache_kv)` replaces the decoder layers (pipeline parallelism runs them in
  stages, parallel/pipeline_decode.py). The methods `embed` and `head` are the two ends
  on their own (pipeline parallelism runs the layers between them in stages), and `hidden` the
  rest (the head's input).

  Without a cache or branch ids, positions must increase with the index within each segment (as
  packed rows do), the rows being in natural order or, with `context_order` = d > 1, in the
  load-balanced order of context degree d (parallel/context.py): the index-masked attention
  kernels rely on it.
  """

  cfg: ModelConfig
  lm_head: bool = True  # False: no output projection (a backbone for `features`)
  context_order: int = 1

  def setup(self):
    cfg = self.cfg
    # Rows are gathered before casting: the whole table is cast only when it is also the head.
    self.embedding = declare(
      self, "embedding", (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg, cast=False
    )
    self.segments = tuple(
      _scanned_layers(cfg, segment.count)(cfg, fp8=segment.fp8, name=segment.name)
      for segment in cfg.layer_segments()
    )
    self.final_norm = RMSNorm(cfg)
    if self.lm_head and not cfg.tie_embeddings:
      self.output = declare(self, "output", (cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg)

  def embed(self, tokens_BT):
    """tokens [B, T] int -> embeddings [B, T, D] in the compute dtype."""
    x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return nn.with_logical_constraint(x_BTD, ACT_BTD)

  def head(self, x_BTD):
    """Final norm and output projection: [B, T, D] -> logits [B, T, vocab] float32."""
    x_BTD = self.final_norm(x_BTD)
    if self.cfg.tie_embeddings:
      logits_BTV = jnp.einsum(
        "btd,vd->btv",
        x_BTD,
        self.embedding.astype(x_BTD.dtype),
        preferred_element_type=jnp.float32,
      )
    else:
      logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.output, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))

  def _decoder(self, x_BTD, cache_kv, positions_BT, mask: AttentionMask, cache_index):
    """Every decoder layer, stack by stack (the config's layer segments): -> (x, cache_kv)."""
    carry = (x_BTD, cache_kv)
    for segment, stack in zip(self.cfg.layer_segments(), self.segments):
      layer_indices = jnp.arange(segment.start, segment.start + segment.count)
      carry, _ = stack(carry, layer_indices, positions_BT, mask, cache_index)
    return carry

  def hidden(self, tokens, positions=None, segment_ids=None, branch_ids=None):
    """The last layer's output [B, T, D] before the final norm (what `head` takes), no cache."""
    positions, segment_ids = _default_inputs(tokens, positions, segment_ids, branch_ids)
    mask = AttentionMask.self_attention(positions, segment_ids, branch_ids, self.context_order)
    x_BTD, _ = self._decoder(self.embed(tokens), None, positions, mask, None)
    return x_BTD

  def features(self, tokens, positions=None, segment_ids=None, branch_ids=None):
    """The final-normed hidden states [B, T, D] (what the head projects), no cache."""
    return self.final_norm(self.hidden(tokens, positions, segment_ids, branch_ids))

  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    cache: Optional[KVCache] = None,
    logits_at=None,
    branch_ids=None,
    run_layers=None,
  ):
    start = 0 if cache is None else cache.index
    positions, segment_ids = _default_inputs(
      tokens, positions, segment_ids, branch_ids, start=start
    )
    batch, length = tokens.shape
    if cache is not None and length > cache.slots:
      raise ValueError(f"{length} tokens do not fit a KV cache of {cache.slots} slots")
    if cache is not None and branch_ids is not None:
      raise ValueError("branch_ids are for scoring without a KV cache")

    if cache is None:
      cache_kv, cache_index = None, None
      mask = AttentionMask.self_attention(positions, segment_ids, branch_ids, self.context_order)
    else:
      cache_index = cache.index
      kv_positions = jax.lax.dynamic_update_slice_in_dim(
        cache.positions, positions.astype(jnp.int32), cache_index, axis=1
      )
      kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(
        cache.segment_ids, segment_ids.astype(jnp.int32), cache_index, axis=1
      )
      cache_kv = (cache.k, cache.v)
      mask = AttentionMask.over_cache(positions, segment_ids, kv_positions, kv_segment_ids)

    run_layers = run_layers or self._decoder
    x_BTD, cache_kv = run_layers(self.embed(tokens), cache_kv, positions, mask, cache_index)
    if logits_at is not None:
      x_BTD = x_BTD[jnp.arange(batch), logits_at][:, None]
    logits_BTV = self.head(x_BTD)
    if logits_at is not None:
      logits_BTV = logits_BTV[:, 0]

    if cache is None:
      return logits_BTV
    new_cache = KVCache(
      k=cache_kv[0],
      v=cache_kv[1],
      positions=kv_positions,
      segment_ids=kv_segment_ids,
      index=cache_index + length,
    )
    return logits_BTV, new_cache
