"""Memory over a long run: pretrains (the pretraining flags, 300 steps with held-out evaluations and
saves by default) while sampling this process's resident memory as each batch is drawn, then
prints the RSS every 25 steps and its growth per 100 steps (least squares) after the first 100
(compiles, the first saves and evaluations settle there). Exits 1 when it grows by more than
--max_growth_mib per 100 steps.

  python experiments/soak.py --config tiny --steps 300
"""

import os
import tempfile

import cli
import jax
import numpy as np
from absl import flags

import llama3_jax as l3
from llama3_jax.data import make_pipeline
from llama3_jax.train.loop import train_run

cli.define(*cli.PRETRAINING_GROUPS)
FLAGS = flags.FLAGS
_MAX_GROWTH_MIB = flags.DEFINE_float(
  "max_growth_mib", 32.0, "Fail when RSS grows more than this per 100 steps after step 100."
)
WARMUP_STEPS = 100  # compiles, the first saves and evaluations settle


def rss_mib() -> float:
  """Resident set size of this process (MiB), from /proc."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise OSError("No VmRSS in /proc/self/status")


class SampledBatches:
  """A batch iterator (with its checkpointable position) noting the RSS as each batch is drawn."""

  def __init__(self, batches):
    self._batches = batches
    self.rss = []

  def __iter__(self):
    return self

  def __next__(self):
    self.rss.append(rss_mib())
    return next(self._batches)

  def get_state(self):
    return self._batches.get_state()

  def set_state(self, state):
    self._batches.set_state(state)


def main(argv):
  del argv
  if not FLAGS.checkpoint_dir:
    FLAGS.checkpoint_dir = tempfile.mkdtemp(prefix="soak-")
  run = cli.run_config(l3.get_config(FLAGS.config, param_dtype="float32"))
  tokenizer = l3.Tokenizer.default()
  batches = SampledBatches(make_pipeline(run.data, tokenizer, split="train"))
  train_run(run, tokenizer, batches=batches)
  rss = np.array(batches.rss)
  for step in range(25, len(rss) + 1, 25):
    print(f"step {step}: RSS {rss[step - 1]:,.0f} MiB")
  for start in range(WARMUP_STEPS, len(rss) - 50, 100):
    print(
      f"growth steps {start}-{min(start + 100, len(rss))}: {_slope(rss, start, start + 100):+.1f} MiB per 100 steps"
    )
  growth = _slope(rss, WARMUP_STEPS, len(rss))
  print(f"growth after step {WARMUP_STEPS}: {growth:+.1f} MiB per 100 steps (least squares)")
  print(f"devices: {jax.device_count()}, checkpoints in {os.path.abspath(FLAGS.checkpoint_dir)}")
  if growth > _MAX_GROWTH_MIB.value:
    raise SystemExit(f"RSS grew more than {_MAX_GROWTH_MIB.value} MiB per 100 steps")


def _slope(rss: np.ndarray, start: int, end: int) -> float:
  """Least-squares growth of the RSS samples of steps [start, end) in MiB per 100 steps: saves
  and evaluations make it saw-toothed, so a fit, not two samples."""
  steps = np.arange(start, min(end, len(rss)))
  return float(np.polyfit(steps, rss[steps], 1)[0] * 100)


if __name__ == "__main__":
  FLAGS.set_default("steps", 300)
  FLAGS.set_default("eval_every", 25)
  FLAGS.set_default("save_every", 25)
  FLAGS.set_default("held_out_fraction", 0.05)
  FLAGS.set_default("global_batch_size", 2)
  FLAGS.set_default("seq_len", 16)
  FLAGS.set_default("log_every", 50)
  cli.run(main)
