"""Direct Preference Optimization's hyperparameters (Llama 3 paper Sec. 4.1.4)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """DPO hyperparameters; the defaults are the Llama 3 paper's."""

  beta: float = 0.1
  nll_weight: float = 0.2
  label_smoothing: float = 0.0

  def __post_init__(self):
    if not self.beta > 0:
      raise ValueError(f"beta must be > 0, got {self.beta}")
    if not self.nll_weight >= 0:
      raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
