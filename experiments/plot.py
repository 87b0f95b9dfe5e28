"""Draws the training curves of one or several runs (loss with its held-out twin, learning rate,
throughput; or --metrics) to a PNG.

  python experiments/plot.py --runs /tmp/tiny_run --output /tmp/tiny_run/curves.png
  python experiments/plot.py --runs base=/runs/a,long=/runs/b/metrics.jsonl --metrics loss,grad_norm
"""

import os

import cli
from absl import flags, logging

from llama3_jax.train.curves import PANELS, plot_curves
from llama3_jax.train.metrics import JSONL_NAME, read_records

FLAGS = flags.FLAGS

_RUNS = flags.DEFINE_list(
  "runs",
  None,
  "Runs, comma-separated: [NAME=]PATH, PATH a metrics JSONL file or a run's --checkpoint_dir "
  f"(its {JSONL_NAME}); NAME defaults to the directory's name.",
)
_METRICS = flags.DEFINE_list("metrics", list(PANELS), "Metrics drawn, a panel each.")
cli.define("output")
cli.required("runs", "output")


def _records(spec: str):
  """(name, records) of a [NAME=]PATH entry of --runs."""
  name, _, path = spec.rpartition("=")
  jsonl = os.path.join(path, JSONL_NAME) if os.path.isdir(path) else path
  if not os.path.isfile(jsonl):
    raise FileNotFoundError(f"--runs {spec}: no metrics file {jsonl}")
  run = name or os.path.basename(os.path.dirname(os.path.abspath(jsonl)))
  return run, read_records(jsonl)


def main(argv):
  del argv
  runs = dict(_records(spec) for spec in _RUNS.value)
  plot_curves(runs, FLAGS.output, _METRICS.value)
  logging.info(
    "Wrote %s (%s)", FLAGS.output, ", ".join(f"{k}: {len(v)} steps" for k, v in runs.items())
  )


if __name__ == "__main__":
  cli.run(main)
