"""The model description: one frozen dataclass holding every field that differs across the Llama 3 family."""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from llama3_jax.config.base import ConfigBase

DTYPES = ("float32", "bfloat16", "float16")
# xla: einsum over a [B, T, S] mask (the reference); dot_product: jax.nn.dot_product_attention on
# that mask; flash: block-wise pure JAX, O(T) memory; splash: the TPU Pallas kernel; gpu_flash: the
# Pallas-Triton GPU kernel; auto: splash on TPU, gpu_flash on GPU, flash for long rows elsewhere,
# xla for short ones (model/attention.py).
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "flash", "splash", "gpu_flash")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "offload")
# None: every weight in `param_dtype`. fp8: the paper's serving quantization (Sec. 6.2): the
# feed-forward weights of every layer but the first and the last in e4m3 with a float32 scale per
# output channel, their inputs quantized per token at run time (model/fp8.py).
QUANTIZATIONS = (None, "fp8")
# Fields that change how a model computes, not what its parameters are: checkpoints that differ
# only in these hold the same architecture (a run may resume across them; models average).
COMPUTE_FIELDS = (
  "name",
  "dtype",
  "attention_impl",
  "attention_block_q",
  "attention_block_kv",
  "remat_policy",
  "max_seq_len",
)


def architecture_differences(
  found: Dict, expected: Dict, ignore: Sequence[str] = COMPUTE_FIELDS
) -> List[Tuple[str, object, object]]:
  """(field, found value, expected value), sorted by field, for every field of two
  `ModelConfig.to_dict()`s that differs, other than those in `ignore`. Resuming ignores
  `COMPUTE_FIELDS`; averaging also ignores `param_dtype` (models stored in other dtypes
  average)."""
  return sorted(
    (field, found.get(field), value)
    for field, value in expected.items()
    if field not in ignore and found.get(field) != value
  )


def meta_ffn_dim(dim: int, ffn_dim_multiplier: Optional[float], multiple_of: int) -> int:
  """SwiGLU hidden size by Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`."""
  hidden = int(2 * 4 * dim / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 ("llama3") RoPE frequency scaling; wavelengths are in tokens."""

  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_context: int = 8192

  def __post_init__(self):
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ValueError(
        "RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
        f"{self.low_freq_factor} and {self.high_freq_factor}"
      )
    if self.original_context <= 0:
      raise ValueError(f"RopeScaling.original_context must be > 0, got {self.original_context}")


@dataclasses.dataclass(frozen=True)
class LayerSegment:
  """Consecutive decoder layers `start`..`start + count - 1` scanned as one stack under parameter
  name `name` (leading axis `count`); `fp8`: their feed-forward weights are quantized."""

  name: str
  start: int
  count: int
  fp8: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigBase):
  """A Llama 3 dense decoder.

  `dtype` is the compute dtype of matmuls; norms, softmax and RoPE run in float32.
  `param_dtype` is the storage dtype of parameters. `attention_block_q` / `attention_block_kv`
  are the query and key tile sizes (tokens) of the block-wise attention kernels.
  `quantization` (QUANTIZATIONS) changes the parameters; `fp8_activation_scale_ub` is the
  largest activation row maximum an fp8 model's scales take (larger values are clipped to it).
  """

  name: str
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 500_000.0
  rope_scaling: Optional[RopeScaling] = None
  tie_embeddings: bool = False
  max_seq_len: int = 8192
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  attention_impl: str = "auto"
  attention_block_q: int = 512
  attention_block_kv: int = 512
  remat_policy: str = "none"
  quantization: Optional[str] = None
  fp8_activation_scale_ub: float = 1200.0

  def __post_init__(self):
    for field in (
      "vocab_size",
      "dim",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "ffn_dim",
      "max_seq_len",
      "attention_block_q",
      "attention_block_kv",
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
    if self.dim % self.n_heads:
      raise ValueError(f"ModelConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got dim/n_heads = {self.head_dim}")
    if self.norm_eps <= 0 or self.rope_theta <= 0:
      raise ValueError("ModelConfig.norm_eps and rope_theta must be > 0")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(
          f"ModelConfig.{field} must be one of {DTYPES}, got {getattr(self, field)!r}"
        )
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
        f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}"
      )
    if self.quantization not in QUANTIZATIONS:
      raise ValueError(
        f"ModelConfig.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
      )
    if self.quantization == "fp8" and self.n_layers < 3:
      raise ValueError(
        f"ModelConfig.quantization='fp8' keeps the first and last layers unquantized, so it needs "
        f"n_layers >= 3, got {self.n_layers}"
      )
    if not self.fp8_activation_scale_ub > 0:
      raise ValueError(
        f"ModelConfig.fp8_activation_scale_ub must be > 0, got {self.fp8_activation_scale_ub}"
      )

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def layer_segments(self) -> Tuple[LayerSegment, ...]:
    """The decoder layers as scanned stacks, in order: one stack `layers`, or with fp8 the
    unquantized `first_layer` and `last_layer` around the quantized `layers`."""
    if self.quantization is None:
      return (LayerSegment("layers", 0, self.n_layers),)
    last = self.n_layers - 1
    return (
      LayerSegment("first_layer", 0, 1),
      LayerSegment("layers", 1, last - 1, fp8=True),
      LayerSegment("last_layer", last, 1),
    )

  @classmethod
  def _from_fields(cls, fields: dict) -> dict:
    if fields.get("rope_scaling") is not None:
      fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return fields
