"""The paper's 4D layout on 16 fake devices, fsdp 2 x pipeline 2 x context 2 x tensor 2, trains
exactly like one device: in the library (losses, gradients, parameters over 3 steps) and through
`experiments/pretrain.py --mesh=...`. Each run is a subprocess: this process has 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = "fsdp=2,pipeline=2,context=2,tensor=2"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}

TRAIN_BOTH = f"""
import jax, numpy as np
from llama3_jax.config import MeshConfig
from test_sharded_training import train
assert len(jax.devices()) == 16
results = {{}}
for name, mesh_cfg, devices in [
  ("one", MeshConfig(fsdp=1), jax.devices()[:1]),
  ("4d", MeshConfig.parse("{LAYOUT}"), jax.devices()),
]:
  losses, grads, params = train(mesh_cfg, devices)
  results[name + "/losses"] = losses
  for i, leaf in enumerate(jax.tree.leaves(grads)):
    results[f"{{name}}/grad{{i}}"] = leaf
  for i, leaf in enumerate(jax.tree.leaves(params)):
    results[f"{{name}}/param{{i}}"] = leaf
np.savez(__import__("sys").argv[1], **results)
"""


def _with_devices(n: int):
  return {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def test_4d_mesh_trains_like_one_device(tmp_path):
  out = tmp_path / "results.npz"
  done = subprocess.run(
    [sys.executable, "-c", TRAIN_BOTH, str(out)],
    cwd=os.path.join(REPO, "tests"),
    env=_with_devices(16),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = np.load(out)
  np.testing.assert_allclose(results["4d/losses"], results["one/losses"], rtol=1e-5)
  assert results["4d/losses"][-1] < results["4d/losses"][0]
  names = [k.split("/")[1] for k in results.files if k.startswith("one/") and k != "one/losses"]
  assert len(names) > 10
  for name in names:
    expected = results[f"one/{name}"]
    atol = 1e-5 * np.abs(expected).max() if name.startswith("grad") else 1e-5
    np.testing.assert_allclose(results[f"4d/{name}"], expected, rtol=0, atol=atol, err_msg=name)


def _pretrain(tmp_path, name: str, devices: int, mesh: str):
  metrics = tmp_path / f"{name}.jsonl"
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "pretrain.py"),
      "--config=tiny",
      "--steps=3",
      "--global_batch_size=8",
      "--seq_len=32",
      "--lr=3e-3",
      "--eval_every=0",
      "--max_new_tokens=0",
      f"--mesh={mesh}",
      f"--metrics_file={metrics}",
    ],
    env=_with_devices(devices),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  return done.stderr, np.array([[r["loss"], r["grad_norm"]] for r in records])


def test_4d_mesh_through_the_cli(tmp_path):
  log, four_d = _pretrain(tmp_path, "4d", 16, LAYOUT)
  assert "'fsdp': 2, 'pipeline': 2, 'context': 2, 'tensor': 2} over 16 devices" in log
  assert "Pipeline: 2 stages x 1 virtual, 2 micro-batches, bubble fraction 0.333" in log
  _, one = _pretrain(tmp_path, "one", 1, "fsdp=1")
  assert four_d.shape == (3, 2)
  np.testing.assert_allclose(four_d, one, rtol=1e-5)
