"""experiments/sft.py end to end: on a synthetic chat set, on a 2 x 2 (fsdp x tensor) mesh of fake
devices, SFT lowers the held-out loss (over the assistant's tokens) and leaves a checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["red", "green", "blue", "yellow", "black", "white"]


def _synthetic_chats(path, n: int):
  """The user lists colours; the assistant lists them back in reverse order."""
  rng = np.random.RandomState(0)
  with open(path, "w") as f:
    for _ in range(n):
      colours = list(rng.choice(WORDS, rng.randint(3, 7)))
      dialog = [
        {"role": "system", "content": "Reverse the list."},
        {"role": "user", "content": " ".join(colours)},
        {"role": "assistant", "content": " ".join(reversed(colours))},
      ]
      f.write(json.dumps({"messages": dialog}) + "\n")


def test_sft_lowers_held_out_loss_on_a_2x2_mesh(tmp_path):
  _synthetic_chats(tmp_path / "chats.jsonl", 400)
  metrics = tmp_path / "metrics.jsonl"
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "sft.py"),
      "--config=tiny",
      f"--data={tmp_path / 'chats.jsonl'}",
      "--mesh=fsdp=2,tensor=2",
      "--steps=16",
      "--global_batch_size=4",
      "--seq_len=48",
      "--lr=3e-3",
      "--eval_every=8",
      "--held_out_fraction=0.1",
      f"--checkpoint_dir={tmp_path / 'run'}",
      "--save_every=16",
      f"--metrics_file={metrics}",
    ],
    env={
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    },
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "'fsdp': 2, 'pipeline': 1, 'context': 1, 'tensor': 2} over 4 devices" in done.stderr
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 2
  assert evals[-1] < evals[0] - 1.0, evals
  # Targets are the assistant's tokens only: far fewer than the packed tokens of a step.
  assert all(0 < r["tokens"] < 4 * 48 / 2 for r in records)
  assert os.path.isdir(tmp_path / "run" / "16")
