"""Converts a checkpoint (Meta consolidated, Hugging Face or ours) to Hugging Face or our Orbax format.

python experiments/convert.py --checkpoint ~/Llama3.2-1B --output /tmp/llama3.2-1b --to orbax
"""

import os

import cli
from absl import app, flags, logging

from llama3_jax.config.model_config import DTYPES
from llama3_jax.convert import load_checkpoint, save_hf, save_orbax

cli.define("checkpoint", "output")
cli.required("checkpoint", "output")
FLAGS = flags.FLAGS
_TO = flags.DEFINE_enum("to", None, ["hf", "orbax"], "Output format.", required=True)
_ROPE_SCALING_FACTOR = flags.DEFINE_float(
  "rope_scaling_factor", None, "Meta checkpoints only: RoPE scaling factor (params.json lacks it)."
)
_PARAM_DTYPE = flags.DEFINE_enum(
  "param_dtype", None, list(DTYPES), "Parameter dtype to write; default: the input's."
)


def main(argv):
  del argv
  output = FLAGS.output
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise app.UsageError(f"--output {output} exists and is not an empty directory")
  overrides = {"param_dtype": _PARAM_DTYPE.value} if _PARAM_DTYPE.value else {}
  cfg, params = load_checkpoint(
    FLAGS.checkpoint, rope_scaling_factor=_ROPE_SCALING_FACTOR.value, **overrides
  )
  if _TO.value == "hf":
    save_hf(output, cfg, params)
  else:
    save_orbax(output, cfg, params)
  logging.info(
    "Converted %s (%s, %s params) to %s format at %s",
    FLAGS.checkpoint,
    cfg.name,
    cfg.param_dtype,
    _TO.value,
    output,
  )


if __name__ == "__main__":
  cli.run(main)
