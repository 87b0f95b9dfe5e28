"""What one training step does beyond the model and optimizer."""

import dataclasses

from llama3_jax.config.base import ConfigBase


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
  """`steps` is the step to train up to; `micro_batches` splits each global batch for gradient
  accumulation (float32 sums); `z_loss_weight` adds weight * logsumexp(logits)^2 per target;
  after `max_nonfinite_steps` consecutive steps with a NaN/Inf loss or gradient (each skipped)
  training stops. Held-out loss every `eval_every` steps (0: never) over `eval_batches` batches.
  `peak_tflops_per_device` (bf16 dense peak, 0: unknown) turns achieved TFLOP/s into MFU."""

  steps: int = 1000
  micro_batches: int = 1
  z_loss_weight: float = 0.0
  max_nonfinite_steps: int = 10
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 4
  peak_tflops_per_device: float = 0.0

  def __post_init__(self):
    for field in ("steps", "micro_batches", "max_nonfinite_steps", "log_every", "eval_batches"):
      if getattr(self, field) < 1:
        raise ValueError(f"TrainConfig.{field} must be >= 1, got {getattr(self, field)}")
    if self.eval_every < 0 or self.peak_tflops_per_device < 0:
      raise ValueError("TrainConfig.eval_every and peak_tflops_per_device must be >= 0")
    if self.z_loss_weight < 0:
      raise ValueError(f"TrainConfig.z_loss_weight must be >= 0, got {self.z_loss_weight}")
