"""What one training step does beyond the model and optimizer."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`micro_batches` splits each global batch for gradient accumulation (float32 sums);
  `z_loss_weight` adds weight * logsumexp(logits)^2 per target; after `max_nonfinite_steps`
  consecutive steps with a NaN/Inf loss or gradient (each skipped) training stops."""

  steps: int = 1000
  micro_batches: int = 1
  z_loss_weight: float = 0.0
  max_nonfinite_steps: int = 10

  def __post_init__(self):
    if self.steps < 1 or self.micro_batches < 1 or self.max_nonfinite_steps < 1:
      raise ValueError(f"TrainConfig.steps, micro_batches and max_nonfinite_steps must be >= 1: {self}")
    if self.z_loss_weight < 0:
      raise ValueError(f"TrainConfig.z_loss_weight must be >= 0, got {self.z_loss_weight}")
