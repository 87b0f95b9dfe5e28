"""Rotary position embedding with Llama 3.1 frequency scaling, half-split layout.

The model keeps q/k features as [first half | second half] pairs (Hugging Face's layout); Meta's
interleaved checkpoints are permuted into it on conversion (`llama3_jax.convert.layout`).
"""

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from llama3_jax.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> np.ndarray:
  """[head_dim // 2] float32 angular frequencies in radians per position.

  Computed in float32 in the same order of operations as the reference implementations, so
  that angles at large positions agree bit for bit.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  low_freq_wavelen = scaling.original_context / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_context / scaling.high_freq_factor
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
  smooth = (
    (scaling.original_context / wavelen - scaling.low_freq_factor)
    / (scaling.high_freq_factor - scaling.low_freq_factor)
  ).astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTHK: jnp.ndarray, positions_BT: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates [B, T, heads, head_dim] features by angle position * frequency, in float32."""
  angles_BTK = positions_BT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
  cos = jnp.cos(angles_BTK)[:, :, None, :]
  sin = jnp.sin(angles_BTK)[:, :, None, :]
  x = x_BTHK.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BTHK.dtype)
