"""AdamW and the learning-rate schedule of Llama 3 pretraining (paper Sec. 3.4)."""

import dataclasses

from llama3_jax.config.base import ConfigBase

WEIGHT_DECAY_MASKS = ("all", "matrices", "none")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(ConfigBase):
  """Linear warm-up to `peak_lr`, cosine decay to `floor_ratio * peak_lr` at `decay_steps`, then
  constant; optionally a linear anneal to 0 over the last `anneal_steps` steps of training.

  `weight_decay_mask`: "matrices" decays parameters of rank >= 2 (not norm scales), "all" every
  parameter, "none" nothing. Gradients are clipped to global norm `clip_norm` (0 disables).
  """

  peak_lr: float = 3e-4
  warmup_steps: int = 8000
  decay_steps: int = 1_200_000
  floor_ratio: float = 0.01
  anneal_steps: int = 0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  weight_decay_mask: str = "matrices"
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.peak_lr <= 0:
      raise ValueError(f"OptimizerConfig.peak_lr must be > 0, got {self.peak_lr}")
    if self.warmup_steps < 0 or self.anneal_steps < 0:
      raise ValueError("OptimizerConfig.warmup_steps and anneal_steps must be >= 0")
    if self.decay_steps <= self.warmup_steps:
      raise ValueError(
        f"OptimizerConfig.decay_steps={self.decay_steps} must exceed warmup_steps="
        f"{self.warmup_steps}"
      )
    if not 0 <= self.floor_ratio <= 1:
      raise ValueError(f"OptimizerConfig.floor_ratio must be in [0, 1], got {self.floor_ratio}")
    if self.weight_decay_mask not in WEIGHT_DECAY_MASKS:
      raise ValueError(
        f"OptimizerConfig.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got "
        f"{self.weight_decay_mask!r}"
      )
    if self.eps <= 0 or self.weight_decay < 0:
      raise ValueError(
        f"OptimizerConfig needs eps > 0 and weight_decay >= 0, got {self.eps} and "
        f"{self.weight_decay}"
      )
    if self.clip_norm < 0:
      raise ValueError(f"OptimizerConfig.clip_norm must be >= 0, got {self.clip_norm}")
