"""dry_run compiles llama3.1-8b's train step on 8 fake devices without allocating it and reports
per-device memory; the parameter + optimizer state matches its closed form."""

import os
import re
import subprocess
import sys

import pytest

import llama3_jax as l3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("layout", ["fsdp=8", "fsdp=4,tensor=2"])
def test_dry_run_reports_per_device_memory(layout):
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "dry_run.py"),
      "--config=llama3.1-8b",
      "--devices=8",
      f"--mesh={layout}",
      "--global_batch_size=8",
      "--seq_len=512",
    ],
    env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  state_gib = float(
    re.search(r"state \(parameters \+ Adam moments\): ([\d.]+) GiB", result.stdout)[1]
  )
  # float32 parameters and two float32 Adam moments, split 8 ways by fsdp (x tensor).
  expected = l3.count_params(l3.get_config("llama3.1-8b")) * 12 / 8 / 2**30
  assert state_gib == pytest.approx(expected, rel=1e-3)
  temporaries = float(re.search(r"temporaries \(.*\): ([\d.]+) GiB", result.stdout)[1])
  assert 0.5 < temporaries < 40
  assert "all-gather" in result.stdout
