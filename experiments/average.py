"""Averages checkpoints of one architecture (Llama 3 paper, Sec. 4) into our Orbax format.

python experiments/average.py --checkpoint /tmp/sft-a --checkpoint /tmp/sft-b --weights 1,3 \
  --output /tmp/sft-average
"""

import os

from absl import app, flags

from llama3_jax.convert import save_orbax
from llama3_jax.convert.orbax_io import is_orbax_checkpoint
from llama3_jax.posttrain.averaging import average_checkpoints, normalized_weights

_CHECKPOINT = flags.DEFINE_multi_string(
  "checkpoint",
  None,
  "Checkpoint directory to average (ours, Hugging Face or Meta); repeat once per checkpoint.",
  required=True,
)
_WEIGHTS = flags.DEFINE_list(
  "weights", None, "Comma-separated non-negative weights, one per --checkpoint; default: uniform."
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Directory to write the averaged checkpoint to.", required=True
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace an existing llama3_jax checkpoint at --output."
)


def _weights():
  """--weights as floats, or None (uniform)."""
  if _WEIGHTS.value is None:
    return None
  try:
    return [float(weight) for weight in _WEIGHTS.value]
  except ValueError:
    raise app.UsageError(f"--weights must be comma-separated numbers, got {_WEIGHTS.value}")


def _check_output_replaceable(output: str, overwrite: bool) -> None:
  """Fails before any checkpoint is read when saving to `output` would be refused."""
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    if not (overwrite and is_orbax_checkpoint(output)):
      raise app.UsageError(
        f"--output {output} exists; only a llama3_jax checkpoint can be replaced, "
        "and only with --overwrite"
      )


def main(argv):
  del argv
  _check_output_replaceable(_OUTPUT.value, _OVERWRITE.value)
  weights = _weights()
  cfg, params = average_checkpoints(_CHECKPOINT.value, weights)
  save_orbax(_OUTPUT.value, cfg, params, overwrite=_OVERWRITE.value)
  for path, fraction in zip(_CHECKPOINT.value, normalized_weights(weights, len(_CHECKPOINT.value))):
    print(f"{path}: weight {fraction:.6g}")
  print(f"averaged {cfg.name} checkpoint written to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
