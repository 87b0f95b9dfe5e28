"""Pretraining runs end to end: exact resume after a kill (its metrics one record per step in the
JSON lines and TensorBoard, and its curves drawn), restore onto another mesh, clear errors."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import llama3_jax as l3
from llama3_jax.config import (
  CheckpointConfig,
  DataConfig,
  DataSource,
  MeshConfig,
  OptimizerConfig,
  RunConfig,
  TrainConfig,
  parse_ramp,
)
from llama3_jax.train.checkpointing import check_resumable
from llama3_jax.train.loop import train
from llama3_jax.train.metrics import MetricsOutputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(metrics_file):
  """step -> loss, the last record of a step winning (a resumed run repeats steps)."""
  if not os.path.exists(metrics_file):
    return {}
  with open(metrics_file) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f.read().splitlines())}


def _pretrain_command(directory, metrics_file, save_every=5):
  """20 steps; rows 2 x 32 until 320 tokens (5 steps), then 3 x 24 (a second compiled shape)."""
  return [
    sys.executable,
    os.path.join(REPO, "experiments", "pretrain.py"),
    "--config=tiny",
    "--steps=20",
    "--global_batch_size=2",
    "--seq_len=32",
    "--batch_ramp=320:3x24",
    "--lr=3e-3",
    f"--save_every={save_every}",
    "--eval_every=0",
    "--max_new_tokens=0",
    f"--checkpoint_dir={directory}",
    f"--metrics_file={metrics_file}",
  ]


def test_resume_after_kill_repeats_the_straight_run_exactly(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  straight = subprocess.run(
    _pretrain_command(tmp_path / "a", tmp_path / "a.jsonl"),
    env={**env, "JAX_LOG_COMPILES": "1"},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert straight.returncode == 0, straight.stderr[-3000:]

  command = _pretrain_command(tmp_path / "b", tmp_path / "b.jsonl")
  victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and max(_losses(tmp_path / "b.jsonl"), default=0) < 12:
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = max(_losses(tmp_path / "b.jsonl"))
  assert 12 <= killed_at < 20
  resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Restored step" in resumed.stderr

  expected, got = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b.jsonl")
  assert sorted(got) == list(range(1, 21))
  assert [got[s] for s in range(1, 21)] == [expected[s] for s in range(1, 21)]
  with open(tmp_path / "b.jsonl") as f:  # steps 11.. were written twice: kept once
    assert [json.loads(line)["step"] for line in f] == list(range(1, 21))
  events = EventAccumulator(str(tmp_path / "b" / "tensorboard"))  # its default: beside the steps
  events.Reload()
  logged = events.Scalars("train/loss")
  assert [e.step for e in logged] == list(range(1, 21))
  np.testing.assert_allclose([e.value for e in logged], [got[s] for s in range(1, 21)], rtol=1e-6)
  assert len(glob.glob(str(tmp_path / "b" / "tensorboard" / "events.out.tfevents.*"))) == 2
  assert os.path.getsize(tmp_path / "b" / "metrics.png") > 10_000  # the run's curves
  assert expected[20] < expected[1]
  shapes = [r["batch_shape"] for r in map(json.loads, open(tmp_path / "a.jsonl"))]
  assert shapes == [[2, 32]] * 5 + [[3, 24]] * 15
  assert straight.stderr.count("compilation of jit(train_step)") == 2  # one per batch shape


def _run(directory, steps, mesh, seed=0, **model_changes):
  return RunConfig(
    model=l3.get_config("tiny", **model_changes),
    mesh=MeshConfig.parse(mesh),
    optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=2, decay_steps=20),
    data=DataConfig(seq_len=16, global_batch_size=8, seed=seed),
    train=TrainConfig(steps=steps, log_every=5),
    checkpoint=CheckpointConfig(directory=str(directory), save_every=5),
  )


@pytest.fixture(scope="module")
def tokenizer():
  return l3.Tokenizer.default()


def test_checkpoint_restores_onto_another_mesh_with_the_same_losses(tmp_path, tokenizer):
  train(
    _run(tmp_path / "a", 8, "fsdp=8"),
    tokenizer,
    metrics=MetricsOutputs(jsonl=str(tmp_path / "a.jsonl")),
  )
  train(
    _run(tmp_path / "b", 5, "fsdp=8"),
    tokenizer,
    metrics=MetricsOutputs(jsonl=str(tmp_path / "b.jsonl")),
  )
  state = train(
    _run(tmp_path / "b", 8, "fsdp=4,tensor=2"),
    tokenizer,
    metrics=MetricsOutputs(jsonl=str(tmp_path / "b.jsonl")),
  )
  wq = state.params["layers"]["attention"]["wq"]
  assert wq.sharding.spec == P("pipeline", "fsdp", "tensor", None)  # pipeline has degree 1
  expected, got = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b.jsonl")
  np.testing.assert_allclose(
    [got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5
  )


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tokenizer):
  train(_run(tmp_path, 1, "fsdp=8"), tokenizer)
  with pytest.raises(
    ValueError, match=r"does not match the model config: n_layers: checkpoint 4 vs run 2"
  ):
    train(_run(tmp_path, 2, "fsdp=8", n_layers=2), tokenizer)


def test_ramp_stage_that_does_not_divide_over_the_mesh_is_named(tmp_path, tokenizer):
  run = _run(tmp_path, 1, "fsdp=8")
  ramped = run.replace(data=run.data.replace(ramp=parse_ramp("64:12x16")))
  with pytest.raises(ValueError, match=r"global_batch_size=12 \(the stage from token 64\)"):
    train(ramped, tokenizer)


def test_missing_data_path_is_named(tmp_path, tokenizer):
  run = _run(tmp_path, 1, "fsdp=8").data.replace(
    sources=(DataSource(str(tmp_path / "none/*.jsonl"), "jsonl"),)
  )
  with pytest.raises(FileNotFoundError, match="none/\\*.jsonl"):
    train(RunConfig(model=l3.get_config("tiny"), data=run), tokenizer)


def test_sigterm_saves_the_current_step_and_exits_143(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  metrics = tmp_path / "m.jsonl"
  # No periodic saves: a checkpoint can only come from the SIGTERM handler.
  victim = subprocess.Popen(
    _pretrain_command(tmp_path / "run", metrics, save_every=1000),
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 600
  while time.time() < deadline and max(_losses(metrics), default=0) < 6:
    time.sleep(0.2)
  victim.send_signal(signal.SIGTERM)
  _, stderr = victim.communicate(timeout=600)
  assert victim.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # stopped, not finished
  last = max(_losses(metrics))
  assert last < 20
  assert sorted(int(d) for d in os.listdir(tmp_path / "run") if d.isdigit()) == [last]


def test_resume_accepts_a_change_of_compute_settings():
  stored = {"model": l3.get_config("tiny").to_dict()}
  check_resumable(stored, l3.get_config("tiny", remat_policy="full", attention_impl="dot_product"))
  with pytest.raises(ValueError, match="ffn_dim: checkpoint 768 vs run 512"):
    check_resumable(stored, l3.get_config("tiny", ffn_dim=512))
