"""Two processes on localhost (CPU collectives over gloo), 4 fake devices each, train one fsdp=8
mesh through `experiments/pretrain.py`: their losses equal a one-process 8-device run on the same
global batches, and the checkpoint they wrote together restores in one process; a SIGTERM that
reaches one process stops both at the same step, saved; a damaged step is judged once for both."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import RunConfig
from llama3_jax.data import make_pipeline
from llama3_jax.parallel import batch_sharding, make_mesh, mesh_context
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import (
  RunCheckpointer,
  abstract_train_state,
  create_train_state,
  learning_rate_schedule,
  make_optimizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pretrain(tmp_path, extra, devices: int):
  command = [
    sys.executable,
    os.path.join(REPO, "experiments", "pretrain.py"),
    "--config=tiny",
    f"--steps={STEPS}",
    "--global_batch_size=8",
    "--seq_len=32",
    "--lr=3e-3",
    "--eval_every=0",
    "--max_new_tokens=0",
    "--mesh=fsdp=8",
    f"--save_every={STEPS}",
    f"--checkpoint_dir={tmp_path / 'run'}",
    f"--metrics_file={tmp_path / 'metrics.jsonl'}",
  ] + extra
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
  }
  return subprocess.Popen(
    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("two_processes")
  coordinator = f"--coordinator_address=localhost:{_free_port()}"
  jobs = [
    _pretrain(tmp_path, [coordinator, "--num_processes=2", f"--process_id={i}"], devices=4)
    for i in range(2)
  ]
  logs = [job.communicate(timeout=900) for job in jobs]
  for job, (_, stderr) in zip(jobs, logs):
    assert job.returncode == 0, stderr[-3000:]
  return tmp_path, [stderr for _, stderr in logs]


def _reference(run: RunConfig):
  """One process, 8 devices, the same global batches (the two processes' rows together), the same
  initialisation: (per-step losses, final state)."""
  mesh = make_mesh(run.mesh)
  tx = make_optimizer(run.optimizer, run.train.steps)
  state, _ = create_train_state(run.model, tx, mesh, jax.random.key(run.data.seed))
  tokenizer = l3.Tokenizer.default()
  shards = [
    make_pipeline(run.data, tokenizer, split="train", process_index=i, process_count=2)
    for i in range(2)
  ]
  layout = Layout.build(run.model, mesh, run.train)
  step = layout.jit_train_step(tx, learning_rate_schedule(run.optimizer, STEPS))
  losses = []
  with mesh_context(mesh):
    for _ in range(STEPS):
      parts = [next(shard) for shard in shards]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
      losses.append(float(metrics["loss"]))
  return np.array(losses), state, mesh, tx


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(two_process_run):
  tmp_path, logs = two_process_run
  assert "Process 0 of 2: 4 local of 8 devices" in logs[0]
  assert "step 3/3" in logs[0] and "step 3/3" not in logs[1]  # progress from process 0 only
  with open(tmp_path / "metrics.jsonl") as f:
    two_process_losses = np.array([json.loads(line)["loss"] for line in f])

  checkpointer = RunCheckpointer(str(tmp_path / "run"), save_every=STEPS)
  assert checkpointer.latest_step() == STEPS
  stored = checkpointer.stored_config(STEPS)
  assert stored.pop("process_count") == 2
  assert stored.pop("model_kind") == "lm"
  assert stored.pop("schedule")["steps"] == STEPS
  assert stored.pop("progress")["restarts"] == 0
  run = RunConfig.from_dict(stored)
  losses, state, mesh, tx = _reference(run)
  np.testing.assert_allclose(two_process_losses, losses, rtol=1e-5)

  restored, _ = checkpointer.restore(STEPS, abstract_train_state(run.model, tx, mesh), None)
  assert int(restored.step) == STEPS
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5),
    (restored.params, restored.opt_state),
    (state.params, state.opt_state),
  )


def test_resuming_with_another_process_count_is_refused(two_process_run):
  tmp_path, _ = two_process_run
  job = _pretrain(tmp_path, ["--steps=5"], devices=8)
  _, stderr = job.communicate(timeout=600)
  assert job.returncode != 0
  assert "data position was saved by 2 processes and this run has 1" in stderr


def test_a_signal_to_one_process_stops_both_at_one_saved_step(tmp_path):
  coordinator = f"--coordinator_address=localhost:{_free_port()}"
  jobs = [
    _pretrain(
      tmp_path,
      [coordinator, "--num_processes=2", f"--process_id={i}", "--steps=500", "--save_every=1000"],
      devices=4,
    )
    for i in range(2)
  ]
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.2)
  jobs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 must learn of it
  logs = [job.communicate(timeout=600)[1] for job in jobs]
  for job, stderr in zip(jobs, logs):
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  last = [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1]
  assert 2 <= last < 500
  assert f"Stopped by SIGTERM after step {last}" in logs[0]
  assert RunCheckpointer(str(tmp_path / "run"), save_every=1).latest_step() == last


def test_both_processes_take_one_decision_on_a_damaged_checkpoint(two_process_run, tmp_path):
  shutil.copytree(two_process_run[0] / "run", tmp_path / "run")
  step_dir = tmp_path / "run" / str(STEPS)
  target = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(target, "r+b") as f:
    f.seek(128)
    f.write(b"\xff" * 64)
  coordinator = f"--coordinator_address=localhost:{_free_port()}"
  jobs = [
    _pretrain(tmp_path, [coordinator, "--num_processes=2", f"--process_id={i}", "--steps=5"], 4)
    for i in range(2)
  ]
  for job in jobs:  # process 0 judged the step; process 1 must refuse too, not train from scratch
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 2, stderr[-3000:]
    assert f"No step in {tmp_path / 'run'} can be resumed (step {STEPS}:" in stderr
