"""experiments/chaos.py on a short job: SIGKILLs, damaged newest steps and a full disk, resumed each
time, end in the losses of an uninterrupted run, bitwise, with every damage found."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kills_damage_and_a_full_disk_lose_nothing(tmp_path):
  summary_file = tmp_path / "summary.json"
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "chaos.py"),
      "--kills=4",
      "--corruptions=2",
      "--job_steps=24",
      f"--work_dir={tmp_path / 'work'}",
      f"--output_json={summary_file}",
    ],
    capture_output=True,
    text=True,
    timeout=900,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = json.loads(summary_file.read_text())
  assert summary["failed_resumes"] == 0 and summary["losses_bitwise_equal"]
  assert summary["kills"] >= 3
  assert summary["corruptions"] >= 1 and summary["corruptions_missed"] == 0
  assert summary["corruptions_detected"] == summary["corruptions"]
  disk = summary["full_disk"]
  assert disk["returncode"] == 1 and disk["temporary_left"] == []
  assert (
    disk["error"].startswith("pretrain.py: error: Saving step") and "too large" in disk["error"]
  )
  assert 0 < summary["goodput_loop"] < 1
