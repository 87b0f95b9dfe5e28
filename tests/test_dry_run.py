"""dry_run compiles llama3.1-8b's train step on 8 fake devices without allocating it and reports
per-device memory; the parameter + optimizer state matches its closed form, and the analytic
estimate is within 10% of the compiled total. Without compiling, it estimates the paper's 405B
layouts. For a real TPU topology, with libtpu's compiler from this CPU host (the `tpu-aot` extra;
skipped only without it), the tiny preset's step on `v5e:2x2` picks the splash kernel under
`auto`, compiles for TPU and reports memory against the chip's HBM; a step too large for HBM is
named in one line."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

import llama3_jax as l3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_LIBTPU = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="needs the tpu-aot extra (libtpu)"
)


def _dry_run(*flags):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", "dry_run.py"), *flags],
    env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.parametrize("layout", ["fsdp=8", "fsdp=4,tensor=2"])
def test_dry_run_reports_per_device_memory(layout):
  result = _dry_run(
    "--config=llama3.1-8b",
    "--devices=8",
    f"--mesh={layout}",
    "--global_batch_size=8",
    "--seq_len=512",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  state_gib = float(
    re.search(r"state \(parameters \+ Adam moments\): ([\d.]+) GiB", result.stdout)[1]
  )
  # float32 parameters and two float32 Adam moments, split 8 ways by fsdp (x tensor)
  expected = l3.count_params(l3.get_config("llama3.1-8b")) * 12 / 8 / 2**30
  assert state_gib == pytest.approx(expected, rel=1e-3)
  ratio = float(re.search(r"estimate / compiled: ([\d.]+)", result.stdout)[1])
  assert 0.9 <= ratio <= 1.1, result.stdout
  temporaries = float(re.search(r"temporaries \(.*\): ([\d.]+) GiB", result.stdout)[1])
  assert 0.5 < temporaries < 40
  assert "all-gather" in result.stdout


@pytest.mark.parametrize(
  "devices, flags",
  [
    (
      8192,
      ["--mesh=fsdp=64,pipeline=16,tensor=8", "--seq_len=8192", "--global_batch_size=2048"]
      + ["--micro_batches=2", "--pipeline_micro_batches=16", "--pipeline_interleave=2"],
    ),
    (
      16384,
      ["--mesh=fsdp=8,pipeline=16,context=16,tensor=8", "--seq_len=131072"]
      + ["--global_batch_size=128", "--micro_batches=2", "--pipeline_micro_batches=8"],
    ),
  ],
)
def test_estimate_only_for_the_paper_405b_layouts(devices, flags):
  """The paper's 405B: 16M-token batches at 8K on 8,192 GPUs and at 128K on 16,384."""
  cfg = l3.get_config("llama3.1-405b")
  result = _dry_run(
    "--config=llama3.1-405b",
    f"--devices={devices}",
    "--estimate_only",
    "--attention_impl=dot_product",
    *flags,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "126 layers do not split into 16 pipeline stages" in result.stdout
  assert "compiled" not in result.stdout
  terms = dict(
    (name, float(value))
    for name, value in re.findall(r"(\w+) ([\d.]+)(?:,| GiB)", result.stdout.splitlines()[-1])
  )
  # The state's closed form: layers split over fsdp x pipeline x tensor, embedding and head over
  # fsdp x tensor (norms are negligible), 12 bytes per parameter.
  fsdp, tp = (64, 8) if devices == 8192 else (8, 8)
  vocab_params = 2 * cfg.vocab_size * cfg.dim
  layer_params = l3.count_params(cfg) - vocab_params
  state = 12 * (layer_params / (fsdp * 16 * tp) + vocab_params / (fsdp * tp)) / 2**30
  assert terms["state"] == pytest.approx(state, rel=0.01)
  assert 0 < sum(terms.values()) < 80  # fits an 80 GB H100, as in the paper


@NEEDS_LIBTPU
def test_tiny_with_splash_compiles_for_v5e():
  result = _dry_run(
    "--config=tiny",
    "--topology=v5e:2x2",
    "--mesh=fsdp=4",
    "--global_batch_size=8",
    "--seq_len=2048",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TPU topology v5e:2x2 (TPU v5 lite)" in result.stdout
  assert "attention_impl=auto: using splash (on tpu)" in result.stderr
  share = re.search(r"against 16 GiB HBM per chip: (\d+)%, fits", result.stdout)
  assert share and 0 < int(share[1]) < 100, result.stdout
  assert "all-gather" in result.stdout


@NEEDS_LIBTPU
def test_a_step_beyond_hbm_is_named_in_one_line():
  result = _dry_run(
    "--config=tiny",
    "--topology=v5e:2x2",
    "--mesh=fsdp=4",
    "--global_batch_size=64",
    "--seq_len=16384",
    "--remat=none",
  )
  assert result.returncode != 0
  assert re.search(r"does not fit: .*RESOURCE_EXHAUSTED.*exceeds", result.stderr), result.stderr[
    -2000:
  ]
