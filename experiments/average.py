"""Averages checkpoints of one architecture (Llama 3 paper, Sec. 4) into our Orbax format: models
from runs on different data or hyperparameters, or the last steps of one training run (Polyak
averaging of the annealing checkpoints), read and summed in shards on a mesh (--mesh; default:
fsdp over every device).

python experiments/average.py --model /tmp/sft-a --model /tmp/sft-b --weights 1,3 \
  --output /tmp/sft-average
python experiments/average.py --run_dir /ckpt/anneal --last_steps 4 --mesh fsdp=8 \
  --output /tmp/annealed
"""

import os

import cli
from absl import app, flags

from llama3_jax.convert import checkpoint_kind, save_orbax
from llama3_jax.convert.orbax_io import is_orbax_checkpoint, run_steps
from llama3_jax.parallel import make_mesh
from llama3_jax.posttrain.averaging import average_checkpoints, normalized_weights

_MODELS = flags.DEFINE_multi_string(
  "model",
  [],
  "Checkpoint directory to average (ours, a training run's step, Hugging Face or Meta); repeat "
  "once per checkpoint.",
)
_RUN_DIR = flags.DEFINE_string(
  "run_dir", None, "A training run's --checkpoint_dir: average its last --last_steps steps."
)
_LAST_STEPS = flags.DEFINE_integer("last_steps", 0, "How many of --run_dir's newest steps.")
_WEIGHTS = flags.DEFINE_list(
  "weights",
  None,
  "Comma-separated non-negative weights, one per model in the order --run_dir's steps (oldest "
  "first), then each --model; default: uniform.",
)
cli.define("mesh", "output")
cli.required("output")
FLAGS = flags.FLAGS
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


def _checkpoints():
  """The step directories of --run_dir's last --last_steps steps (oldest first), then the
  --model paths."""
  paths = []
  if _RUN_DIR.value:
    steps = run_steps(_RUN_DIR.value)
    if not 1 <= _LAST_STEPS.value <= len(steps):
      raise app.UsageError(
        f"--last_steps must be between 1 and the {len(steps)} steps saved in --run_dir "
        f"{_RUN_DIR.value} ({steps}), got {_LAST_STEPS.value}"
      )
    paths += [os.path.join(_RUN_DIR.value, str(step)) for step in steps[-_LAST_STEPS.value :]]
  paths += _MODELS.value
  if not paths:
    raise app.UsageError("Nothing to average: pass --model (repeated) or --run_dir")
  return paths


def main(argv):
  del argv
  _check_output_replaceable(FLAGS.output, _OVERWRITE.value)
  paths, weights = _checkpoints(), _weights()
  mesh = make_mesh(cli.mesh_config())
  kind = checkpoint_kind(paths[0])  # every other checkpoint must be of this kind
  cfg, params = average_checkpoints(paths, weights, mesh=mesh, kind=kind)
  save_orbax(FLAGS.output, cfg, params, overwrite=_OVERWRITE.value, kind=kind)
  for path, fraction in zip(paths, normalized_weights(weights, len(paths))):
    print(f"{path}: weight {fraction:.6g}")
  print(f"averaged {cfg.name} checkpoint written to {FLAGS.output}")


if __name__ == "__main__":
  cli.run(main)
