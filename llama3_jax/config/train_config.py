"""What one training step does beyond the model and optimizer."""

import dataclasses

from llama3_jax.config.base import ConfigBase


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
  """`steps` is the step to train up to; `micro_batches` splits each global batch for gradient
  accumulation (float32 sums); `z_loss_weight` adds weight * logsumexp(logits)^2 per target;
  after `max_nonfinite_steps` consecutive steps with a NaN/Inf loss or gradient (each skipped)
  training stops. With a `pipeline` mesh axis of S stages, each micro-batch is cut again into
  `pipeline_micro_batches` (0: S) that flow through the stages, and every rank holds
  `pipeline_interleave` virtual stages (1: GPipe; more: the interleaved schedule, a smaller bubble).
  Held-out loss every `eval_every` steps (0: never) over `eval_batches` batches.
  `peak_tflops_per_device` (bf16 dense peak, 0: unknown) turns achieved TFLOP/s into MFU.
  The output head and loss run over `loss_chunk` tokens of each row at a time, their logits
  recomputed in the backward pass (0: all tokens at once)."""

  steps: int = 1000
  micro_batches: int = 1
  pipeline_micro_batches: int = 0
  pipeline_interleave: int = 1
  z_loss_weight: float = 0.0
  max_nonfinite_steps: int = 10
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 4
  peak_tflops_per_device: float = 0.0
  loss_chunk: int = 1024

  def __post_init__(self):
    self._require_at_least(
      1,
      "steps",
      "micro_batches",
      "pipeline_interleave",
      "max_nonfinite_steps",
      "log_every",
      "eval_batches",
    )
    self._require_at_least(
      0,
      "eval_every",
      "peak_tflops_per_device",
      "pipeline_micro_batches",
      "loss_chunk",
      "z_loss_weight",
    )
