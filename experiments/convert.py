"""Converts a checkpoint (Meta consolidated, Hugging Face or ours) to Hugging Face or our Orbax format.

python experiments/convert.py --checkpoint ~/Llama3.2-1B --output /tmp/llama3.2-1b --to orbax
"""

import cli
from absl import flags

from llama3_jax.config.model_config import DTYPES
from llama3_jax.convert import load_checkpoint

cli.define("checkpoint", "output", "format")
cli.required("checkpoint", "output", "to")
FLAGS = flags.FLAGS
_ROPE_SCALING_FACTOR = flags.DEFINE_float(
  "rope_scaling_factor", None, "Meta checkpoints only: RoPE scaling factor (params.json lacks it)."
)
_PARAM_DTYPE = flags.DEFINE_enum(
  "param_dtype", None, list(DTYPES), "Parameter dtype to write; default: the input's."
)


def main(argv):
  del argv
  cli.check_output_is_new()
  overrides = {"param_dtype": _PARAM_DTYPE.value} if _PARAM_DTYPE.value else {}
  cfg, params = load_checkpoint(
    FLAGS.checkpoint, rope_scaling_factor=_ROPE_SCALING_FACTOR.value, **overrides
  )
  cli.save_model(cfg, params)


if __name__ == "__main__":
  cli.run(main)
