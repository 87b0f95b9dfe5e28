"""FP8 row-wise quantization against a numpy reference of fbgemm's `quantize_fp8_per_row` (what
Meta's reference calls): e4m3 rounding written out from the format (4 exponent bits, bias 7, 3
mantissa bits, subnormals below 2^-6, no infinities, largest 448), not taken from a cast."""

import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.model.fp8 import (
  ACTIVATION_SCALE_UB,
  dequantize_rows,
  fp8_matmul,
  quantize_rows,
)


def e4m3_round(v):
  """float32 -> the nearest float8_e4m3fn value (ties to even), as float64; |v| <= 448."""
  v = np.asarray(v, np.float64)
  _, exponent = np.frexp(np.abs(v))  # |v| = m * 2**exponent, m in [0.5, 1)
  spacing = np.exp2(np.maximum(exponent - 1, -6) - 3.0)  # 3 mantissa bits; subnormal below 2^-6
  return np.round(v / spacing) * spacing  # np.round: half to even


def reference_quantize(x, scale_ub=None):
  """(values, scales) of each row of float32 [N, K] x, in fbgemm's float32 arithmetic."""
  x = np.asarray(x, np.float32)
  row_max = np.abs(x).max(axis=1, keepdims=True)
  row_max = np.clip(row_max, np.float32(1e-12), np.float32(scale_ub or np.inf))
  inverse = np.float32(448.0) / row_max
  values = e4m3_round(np.clip(x * inverse, -448, 448))
  return values, (np.float32(1.0) / inverse)[:, 0]


def test_e4m3_reference_rounds_as_the_format_defines():
  """The reference's grid: normals 2^e * (1 + k/8), subnormals k * 2^-9, ties to even."""
  assert e4m3_round(np.float32(448)) == 448 and e4m3_round(np.float32(1.0625)) == 1.0
  assert e4m3_round(np.float32(1.1875)) == 1.25 and e4m3_round(np.float32(3 * 2**-10)) == 2**-8
  assert e4m3_round(np.float32(-0.3)) == -0.3125 and e4m3_round(np.float32(2**-10)) == 0.0


@pytest.mark.parametrize("scale_ub", [None, ACTIVATION_SCALE_UB])
def test_row_quantization_equals_the_reference(scale_ub):
  """Values and scales bitwise, over rows of very different magnitudes."""
  rng = np.random.default_rng(0)
  magnitudes = np.float32([[0], [1e-3], [0.1], [1], [30], [500], [4000]])  # 0: an all-zero row
  x = rng.standard_normal((7, 64)).astype(np.float32) * magnitudes
  values, scales = quantize_rows(jnp.asarray(x), axis=-1, scale_ub=scale_ub)
  want_values, want_scales = reference_quantize(x, scale_ub)
  assert values.dtype == jnp.float8_e4m3fn and scales.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(values, np.float64), want_values)
  np.testing.assert_array_equal(np.asarray(scales), want_scales)  # both divisions exact in float32


def test_the_activation_bound_engages_on_an_outlier():
  """A row with an outlier of 5000 is scaled as if its maximum were 1200: the outlier clips to 448
  (1200 after dequantization); without the bound the scale is 5000 / 448."""
  rng = np.random.default_rng(1)
  row = rng.uniform(-2, 2, (1, 256)).astype(np.float32)
  row[0, 7] = 5000.0
  bounded, bounded_scale = quantize_rows(jnp.asarray(row), scale_ub=ACTIVATION_SCALE_UB)
  free, free_scale = quantize_rows(jnp.asarray(row))
  np.testing.assert_allclose(float(bounded_scale[0]), 1200 / 448, rtol=1e-7)
  np.testing.assert_allclose(float(free_scale[0]), 5000 / 448, rtol=1e-7)
  assert float(bounded[0, 7]) == 448.0
  np.testing.assert_allclose(float(dequantize_rows(bounded, bounded_scale)[0, 7]), 1200, rtol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(bounded, np.float64), reference_quantize(row, ACTIVATION_SCALE_UB)[0]
  )


def test_fp8_matmul_equals_the_quantized_reference_and_nears_the_exact_product():
  """x [2, 3, D] @ w [D, F]: weights per output column, activations per token (bound 1200);
  equal to the reference's e4m3 values multiplied exactly and scaled, to float32 rounding, and
  within a few percent of the unquantized product."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 96)).astype(np.float32)
  x[1, 2, 5] = 3000.0  # one token past the bound
  w = (rng.standard_normal((96, 40)) * 0.05).astype(np.float32)
  w_values, w_scales = quantize_rows(jnp.asarray(w), axis=0)
  want_w, want_w_scales = reference_quantize(w.T)
  np.testing.assert_array_equal(np.asarray(w_values, np.float64), want_w.T)
  got = np.asarray(fp8_matmul(jnp.asarray(x), w_values, w_scales, out_dtype=jnp.float32))
  x_values, x_scales = reference_quantize(x.reshape(6, 96), ACTIVATION_SCALE_UB)
  want = (
    (x_values @ want_w.T) * x_scales[:, None].astype(np.float64) * want_w_scales.astype(np.float64)
  )
  np.testing.assert_allclose(got.reshape(6, 40), want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
  bf16 = np.asarray(fp8_matmul(jnp.asarray(x), w_values, w_scales), np.float32)
  np.testing.assert_allclose(bf16, got, rtol=2**-8)
  exact = x.reshape(6, 96)[:5] @ w  # the tokens within the bound
  error = np.linalg.norm(got.reshape(6, 40)[:5] - exact) / np.linalg.norm(exact)
  assert error < 0.05
