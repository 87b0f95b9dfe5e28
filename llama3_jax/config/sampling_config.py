"""How generation picks each next token."""

import dataclasses
import math

from llama3_jax.config.base import ConfigBase


@dataclasses.dataclass(frozen=True)
class SamplingConfig(ConfigBase):
  """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    self._require_at_least(0, "temperature", "top_k")
    if not math.isfinite(self.temperature):
      raise ValueError(f"SamplingConfig.temperature must be finite, got {self.temperature}")
    if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k:
      raise ValueError(f"SamplingConfig.top_k must be a whole number, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
