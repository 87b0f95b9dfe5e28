"""FP8 row-wise quantization as the paper serves Llama 3 (Sec. 6.2) and Meta's reference runs it
(fbgemm's `quantize_fp8_per_row` and `f8f8bf16_rowwise`).

A row (a weight's output channel, an activation's token) is scaled so that its largest magnitude
maps to the largest float8_e4m3fn value, 448: values = clip(x / scale, -448, 448) rounded to the
nearest e4m3 (ties to even), scale = max|row| / 448 in float32 (the max floored at 1e-12, and for
activations capped at `scale_ub`, 1200 in the paper: an outlier beyond the cap is clipped to it
rather than setting the row's scale). A matmul multiplies the e4m3 values
with float32 accumulation and applies the two row scales to its output.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
ACTIVATION_SCALE_UB = 1200.0  # the paper's upper bound on activation row maxima
SCALE_EPS = 1e-12  # the least row maximum (an all-zero row gets this scale)


def to_e4m3(x: jnp.ndarray) -> jnp.ndarray:
  """`x` clipped to +-448 and rounded to the nearest e4m3 value (ties to even)."""
  return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_rows(
  x: jnp.ndarray, axis: int = -1, scale_ub: Optional[float] = None
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """(e4m3 values shaped like `x`, float32 scales: `x`'s shape without `axis`) with one scale
  for each slice along `axis` (the reduced axis: the input dimension of a row)."""
  x = x.astype(jnp.float32)
  row_max = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  row_max = jnp.clip(row_max, SCALE_EPS, scale_ub) if scale_ub else jnp.maximum(row_max, SCALE_EPS)
  inverse = E4M3_MAX / row_max
  # The barrier keeps XLA from folding 1 / (448 / max) into max * (1 / 448), an ulp off at times.
  scales = 1.0 / jax.lax.optimization_barrier(inverse)
  return to_e4m3(x * inverse), jnp.squeeze(scales, axis)


def dequantize_rows(values: jnp.ndarray, scales: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """float32 values * scales, the inverse of `quantize_rows` up to e4m3 rounding."""
  return values.astype(jnp.float32) * jnp.expand_dims(scales, axis)


def fp8_matmul(
  x_ND: jnp.ndarray,
  w_values_DF: jnp.ndarray,
  w_scales_F: jnp.ndarray,
  scale_ub: Optional[float] = ACTIVATION_SCALE_UB,
  out_dtype=jnp.bfloat16,
) -> jnp.ndarray:
  """x [..., D] @ w [D, F] -> [..., F] in `out_dtype`: `x` quantized per token (dynamic scales,
  capped at `scale_ub`), `w` given as e4m3 values [D, F] with one scale per output column [F];
  the e4m3 products accumulate in float32."""
  x_values, x_scales = quantize_rows(x_ND, axis=-1, scale_ub=scale_ub)
  contract = (((x_ND.ndim - 1,), (0,)), ((), ()))
  out = jax.lax.dot_general(x_values, w_values_DF, contract, preferred_element_type=jnp.float32)
  return (out * x_scales[..., None] * w_scales_F).astype(out_dtype)
