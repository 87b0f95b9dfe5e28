"""Quantizes a checkpoint offline as the paper serves Llama 3 (Sec. 6.2): the feed-forward weights
of every layer but the first and last to fp8 (e4m3, a scale per output channel), written in
Hugging Face's fbgemm_fp8 layout (that of Meta's Llama-3.1-405B-Instruct-FP8) or ours.

python experiments/quantize.py --checkpoint ~/Llama-3.1-8B-Instruct --output /tmp/8b-fp8 --to hf
python experiments/generate.py --checkpoint /tmp/8b-fp8 --prompt "..."   # or --quantize fp8
"""

import cli
from absl import flags

from llama3_jax.convert import load_checkpoint
from llama3_jax.inference.quantize import quantize_params

cli.define("checkpoint", "output", "format")
cli.required("checkpoint", "output", "to")


def main(argv):
  del argv
  cli.check_output_is_new()
  cfg, params = quantize_params(*load_checkpoint(flags.FLAGS.checkpoint))
  cli.save_model(cfg, params)
  print(f"{cfg.name}: {cfg.quantization} checkpoint written to {flags.FLAGS.output}")


if __name__ == "__main__":
  cli.run(main)
