"""The one map between our parameter tree and the PyTorch checkpoint layouts (Meta and Hugging Face).

Both checkpoint formats store each weight as a torch matrix [out_features, in_features] per layer;
we store layers stacked on a leading axis with heads split out. Meta keeps q/k RoPE features as
interleaved pairs, Hugging Face (and this model) as half-split: `interleaved_to_half_split` is the
only place that difference is handled.
"""

import dataclasses
from typing import Callable, Dict, Iterator, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from llama3_jax.config import LayerSegment, ModelConfig

COLUMN_PARALLEL, ROW_PARALLEL = 0, 1


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: where it lives in our tree and under which names in the torch formats.

  `path` starts with the layer stack's name for a layer's tensor (`layer` is its index in that
  stack of `stack` layers). `meta_shard_axis` is the axis Meta's model-parallel shards split
  (None: replicated). `dtype`: the dtype it is stored in whatever the model's `param_dtype` (fp8
  values and their float32 scales), None for `param_dtype`.
  """

  path: Tuple[str, ...]
  layer: Optional[int]
  hf_name: str
  meta_name: str
  meta_shard_axis: Optional[int]
  rope: bool = False
  stack: int = 1
  dtype: Optional[str] = None


_LAYER_TENSORS = (
  # our path in a layer stack,     HF suffix,                        Meta suffix,           shard axis,  rope
  (("attention", "wq"), "self_attn.q_proj.weight", "attention.wq.weight", COLUMN_PARALLEL, True),
  (("attention", "wk"), "self_attn.k_proj.weight", "attention.wk.weight", COLUMN_PARALLEL, True),
  (("attention", "wv"), "self_attn.v_proj.weight", "attention.wv.weight", COLUMN_PARALLEL, False),
  (("attention", "wo"), "self_attn.o_proj.weight", "attention.wo.weight", ROW_PARALLEL, False),
  (
    ("feed_forward", "w1"),
    "mlp.gate_proj.weight",
    "feed_forward.w1.weight",
    COLUMN_PARALLEL,
    False,
  ),
  (("feed_forward", "w3"), "mlp.up_proj.weight", "feed_forward.w3.weight", COLUMN_PARALLEL, False),
  (("feed_forward", "w2"), "mlp.down_proj.weight", "feed_forward.w2.weight", ROW_PARALLEL, False),
  (("attention_norm", "scale"), "input_layernorm.weight", "attention_norm.weight", None, False),
  (("ffn_norm", "scale"), "post_attention_layernorm.weight", "ffn_norm.weight", None, False),
)
# Hugging Face's fbgemm_fp8 layout: a quantized linear's `weight` holds e4m3 values [out, in] and
# `weight_scale` float32 [out, 1]; ours are e4m3 [in, out] and `<name>_scale` [out].
FP8_VALUES, FP8_SCALES = "float8_e4m3fn", "float32"
SCALE_SUFFIX = "_scale"


def _layer_tensors(segment: LayerSegment, index: int) -> Iterator[TensorSpec]:
  """The tensors of layer `index` (its place in the model) of `segment`."""
  layer = index - segment.start
  for path, hf, meta, axis, rope in _LAYER_TENSORS:
    names = (f"model.layers.{index}.{hf}", f"layers.{index}.{meta}")
    fp8 = segment.fp8 and path[0] == "feed_forward"
    dtype = FP8_VALUES if fp8 else None
    yield TensorSpec((segment.name,) + path, layer, *names, axis, rope, segment.count, dtype)
    if fp8:
      scale_path = (segment.name, path[0], path[1] + SCALE_SUFFIX)
      scale_names = (name + SCALE_SUFFIX for name in names)
      yield TensorSpec(scale_path, layer, *scale_names, None, False, segment.count, FP8_SCALES)


def tensor_specs(cfg: ModelConfig) -> Iterator[TensorSpec]:
  """Every tensor of a checkpoint for `cfg`, in checkpoint order."""
  yield TensorSpec(
    ("embedding",), None, "model.embed_tokens.weight", "tok_embeddings.weight", COLUMN_PARALLEL
  )
  for segment in cfg.layer_segments():
    for index in range(segment.start, segment.start + segment.count):
      yield from _layer_tensors(segment, index)
  yield TensorSpec(("final_norm", "scale"), None, "model.norm.weight", "norm.weight", None)
  if not cfg.tie_embeddings:
    yield TensorSpec(("output",), None, "lm_head.weight", "output.weight", COLUMN_PARALLEL)


# Buffers some checkpoints carry that are derived from the config, not weights.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two arrays are bit-identical (NaNs included)."""
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_all_used(
  cfg: ModelConfig,
  names,
  name_of: Callable[[TensorSpec], str],
  head_equals_embedding: Callable[[], bool],
  where: str,
) -> None:
  """Raises ValueError naming the tensors among `names` (a checkpoint's, named by `name_of`)
  that `cfg` has no place for, rather than dropping them: more layers than `cfg.n_layers`, or an
  output head of its own while `cfg` ties it to the embedding (unless `head_equals_embedding()`:
  bit-identical, a tied model saved with both)."""
  used = {name_of(spec) for spec in tensor_specs(cfg)}
  unused = sorted(n for n in names if n not in used and not n.endswith(DERIVED_SUFFIXES))
  head = name_of(TensorSpec(("output",), None, "lm_head.weight", "output.weight", None))
  if head in unused and cfg.tie_embeddings:
    if head_equals_embedding():
      unused.remove(head)
    else:
      raise ValueError(
        f"{where} ties the output head to the embedding, but its {head} differs from the "
        "embedding: untie them (tie_embeddings=False) to keep that head"
      )
  if unused:
    raise ValueError(
      f"{where} has {len(unused)} tensors the config ({cfg.name}, {cfg.n_layers} layers) does "
      f"not use, e.g. {unused[:4]}: its config does not describe its weights"
    )


def torch_shape(spec: TensorSpec, cfg: ModelConfig) -> Tuple[int, ...]:
  """Shape of the tensor in the torch checkpoints."""
  name = spec.path[-1]
  if name == "scale":
    return (cfg.dim,)
  if name.endswith(SCALE_SUFFIX):
    return (cfg.dim if name == "w2" + SCALE_SUFFIX else cfg.ffn_dim, 1)
  return {
    "embedding": (cfg.vocab_size, cfg.dim),
    "output": (cfg.vocab_size, cfg.dim),
    "wq": (cfg.n_heads * cfg.head_dim, cfg.dim),
    "wk": (cfg.n_kv_heads * cfg.head_dim, cfg.dim),
    "wv": (cfg.n_kv_heads * cfg.head_dim, cfg.dim),
    "wo": (cfg.dim, cfg.n_heads * cfg.head_dim),
    "w1": (cfg.ffn_dim, cfg.dim),
    "w3": (cfg.ffn_dim, cfg.dim),
    "w2": (cfg.dim, cfg.ffn_dim),
  }[name]


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Reorders the rows of a Meta q/k matrix [heads * head_dim, in] from (x0, y0, x1, y1, ...) pairs
  to (x0, x1, ..., y0, y1, ...) within each head."""
  rows, cols = w.shape
  return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def from_torch(spec: TensorSpec, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """A torch-layout (half-split) tensor -> our layout for one layer."""
  name = spec.path[-1]
  if name == "wq":
    return w.T.reshape(cfg.dim, cfg.n_heads, cfg.head_dim)
  if name in ("wk", "wv"):
    return w.T.reshape(cfg.dim, cfg.n_kv_heads, cfg.head_dim)
  if name == "wo":
    return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)
  if name in ("w1", "w2", "w3", "output"):
    return w.T
  if name.endswith(SCALE_SUFFIX):
    return w[:, 0]
  return w


def to_torch(spec: TensorSpec, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """Our layout for one layer -> the torch (half-split) layout; inverse of `from_torch`."""
  name = spec.path[-1]
  if name in ("wq", "wk", "wv"):
    w = w.reshape(cfg.dim, -1).T
  elif name == "wo":
    w = w.reshape(-1, cfg.dim).T
  elif name in ("w1", "w2", "w3", "output"):
    w = w.T
  elif name.endswith(SCALE_SUFFIX):
    w = w[:, None]
  return np.ascontiguousarray(w)


def assemble_params(cfg: ModelConfig, read: Callable[[TensorSpec], np.ndarray], dtype) -> Dict:
  """Our parameter tree for `cfg`, filled tensor by tensor from `read(spec)` (torch layout, half-split).

  Each tensor's shape is checked before it is stored, in `dtype` (fp8 tensors in theirs); stacked
  layer arrays are allocated once, so host memory stays near the size of the result.
  """
  params: Dict = {}
  for spec in tensor_specs(cfg):
    w = np.asarray(read(spec))
    expected = torch_shape(spec, cfg)
    if w.shape != expected:
      raise ValueError(
        f"Checkpoint tensor {spec.hf_name!r} has shape {tuple(w.shape)} but the config "
        f"({cfg.name}) expects {expected}"
      )
    ours = from_torch(spec, w, cfg)
    node = params
    for key in spec.path[:-1]:
      node = node.setdefault(key, {})
    stored = jnp.dtype(spec.dtype or dtype)
    if spec.layer is None:
      node[spec.path[-1]] = ours.astype(stored)
    else:
      if spec.path[-1] not in node:
        node[spec.path[-1]] = np.empty((spec.stack,) + ours.shape, stored)
      node[spec.path[-1]][spec.layer] = ours
  return params


def iter_torch_tensors(cfg: ModelConfig, params: Dict) -> Iterator[Tuple[TensorSpec, np.ndarray]]:
  """(spec, torch-layout half-split numpy tensor) for every tensor of `params`, one at a time."""
  for spec in tensor_specs(cfg):
    node = params
    for key in spec.path:
      node = node[key]
    w = np.asarray(node if spec.layer is None else node[spec.layer])
    yield spec, to_torch(spec, w, cfg)
