"""Faults around a run's checkpoints and the loop core (train/fit.py) under pretraining: a
checkpoint path that is a file or lacks room fails before any step, naming it; a second run on one
directory is refused, a stale lock taken over; a resume with other data is refused naming each
setting (or, allowed, starts the data afresh); a resume that only adds steps keeps the
checkpoint's learning-rate schedule; Ctrl-C saves and exits 130; a SIGTERM that lands on a
skipped (non-finite) step still saves it; held-out batches are read from the sources once."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import llama3_jax as l3
from llama3_jax.config import (
  CheckpointConfig,
  DataConfig,
  MeshConfig,
  OptimizerConfig,
  RunConfig,
  TrainConfig,
)
from llama3_jax.data import make_pipeline
from llama3_jax.train import loop
from llama3_jax.train.checkpoint_dir import LOCK_FILE
from llama3_jax.train.checkpointing import RunCheckpointer
from llama3_jax.train.optimizer import learning_rate_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_checkpoint_path_that_is_a_file_fails_at_once(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("")
  start = time.time()
  with pytest.raises(NotADirectoryError, match=f"{path} exists and is not a directory"):
    RunCheckpointer(str(path), save_every=1)
  assert time.time() - start < 5


def test_a_save_needs_room(tmp_path):
  checkpointer = RunCheckpointer(str(tmp_path), save_every=1)
  with pytest.raises(OSError, match="GiB free; a save of this run takes"):
    checkpointer.claim(2**62)
  checkpointer.close()


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
  first, second = (RunCheckpointer(str(tmp_path), save_every=1) for _ in range(2))
  first.claim(0)
  with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()} on"):
    second.claim(0)
  first.close()
  second.claim(0)  # released: free to take
  second.close()
  gone = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  with open(tmp_path / LOCK_FILE, "w") as f:  # left by a killed run on this host
    json.dump({"host": os.uname().nodename, "pid": int(gone.stdout), "job": "", "since": 0}, f)
  third = RunCheckpointer(str(tmp_path), save_every=1)
  third.claim(0)
  with open(tmp_path / LOCK_FILE) as f:
    assert json.load(f)["pid"] == os.getpid()
  third.close()
  assert not (tmp_path / LOCK_FILE).exists()


def _run(directory, steps, save_every=1, eval_every=0, **data_changes):
  return RunConfig(
    model=l3.get_config("tiny"),
    mesh=MeshConfig.parse("fsdp=8"),
    optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=1, decay_steps=steps),
    data=DataConfig(seq_len=16, global_batch_size=8).replace(**data_changes),
    train=TrainConfig(steps=steps, log_every=1, eval_every=eval_every, eval_batches=2),
    checkpoint=CheckpointConfig(directory=str(directory), save_every=save_every),
  )


@pytest.fixture(scope="module")
def tokenizer():
  return l3.Tokenizer.default()


def test_resume_with_other_data_is_refused_by_name_unless_allowed(tmp_path, tokenizer):
  loop.train_run(_run(tmp_path, 2), tokenizer)
  for change, named in [
    (dict(seed=1), "data.seed: checkpoint 0 vs run 1"),
    (dict(seq_len=32), "data.seq_len: checkpoint 16 vs run 32"),
    (dict(global_batch_size=16), "data.global_batch_size: checkpoint 8 vs run 16"),
    (dict(held_out_fraction=0.1), "data.held_out_fraction: checkpoint 0.0 vs run 0.1"),
  ]:
    with pytest.raises(ValueError, match=f"the data differ \\({named}\\)"):
      loop.train_run(_run(tmp_path, 3, **change), tokenizer)
  allowed = _run(tmp_path, 3, seed=1)
  allowed = allowed.replace(checkpoint=allowed.checkpoint.replace(allow_data_change=True))
  assert loop.train_run(allowed, tokenizer).last["step"] == 3


def test_more_steps_keep_the_checkpoints_schedule(tmp_path, tokenizer):
  loop.train_run(_run(tmp_path, 2), tokenizer)
  metrics = tmp_path / "more.jsonl"
  loop.train_run(_run(tmp_path, 4), tokenizer, metrics_file=str(metrics))
  with open(metrics) as f:
    lrs = {r["step"]: r["lr"] for r in map(json.loads, f)}
  kept = learning_rate_schedule(_run(tmp_path, 2).optimizer, 2)
  assert sorted(lrs) == [3, 4]
  for step, lr in lrs.items():  # the record's lr is the schedule at the update's step (step - 1)
    assert lr == pytest.approx(float(kept(step - 1)), rel=1e-6)
  assert lrs[4] == pytest.approx(3e-3 * 0.01, rel=1e-6)  # past the schedule: its floor


def test_ctrl_c_saves_and_exits_130(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  command = [
    sys.executable,
    os.path.join(REPO, "experiments", "pretrain.py"),
    "--config=tiny",
    "--steps=200",
    "--global_batch_size=2",
    "--seq_len=16",
    "--eval_every=0",
    "--max_new_tokens=0",
    "--save_every=1000",
    f"--checkpoint_dir={tmp_path / 'run'}",
    f"--metrics_file={metrics}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  job = subprocess.Popen(
    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.2)
  job.send_signal(signal.SIGINT)
  _, stderr = job.communicate(timeout=300)
  assert job.returncode == 130, stderr[-3000:]
  assert "Stopped by SIGINT after step" in stderr
  last = [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1]
  assert 3 <= last < 200
  assert RunCheckpointer(str(tmp_path / "run"), save_every=1).latest_step() == last


def _sigterm_while_step_runs(batches, step):
  """`batches`, sending SIGTERM to this process as the batch after `step` is drawn, which the
  loop reads while step `step` runs."""
  for drawn, batch in enumerate(batches, start=1):
    if drawn == step + 1:
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch


def test_sigterm_on_a_skipped_pretraining_step_saves_it(tmp_path, tokenizer):
  run = _run(tmp_path, 6, save_every=100)
  params = l3.init_params(run.model, jax.random.key(0))
  params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
  batches = make_pipeline(run.data, tokenizer, split="train")
  result = loop.train_run(
    run,
    tokenizer,
    init_params=params,
    batches=_sigterm_while_step_runs(batches, 2),
    metrics_file=str(tmp_path / "metrics.jsonl"),
  )
  assert result.last["step"] == 2 and result.last["skipped"]
  assert int(result.state.step) == 0 and int(result.state.nonfinite_total) == 2
  assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["2"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert [r["step"] for r in map(json.loads, f)] == [1, 2]


def test_held_out_batches_are_read_once(tmp_path, tokenizer, monkeypatch):
  reads = []

  def counting(data, tokenizer, **kwargs):
    reads.append(kwargs["split"])
    return make_pipeline(data, tokenizer, **kwargs)

  monkeypatch.setattr(loop, "make_pipeline", counting)
  result = loop.train_run(_run(tmp_path, 3, eval_every=1, held_out_fraction=0.05), tokenizer)
  assert reads.count("eval") == 1
  assert result.last["step"] == 3 and result.last["eval_loss"] > 0
