"""Faults around a run's checkpoints and the loop core (train/fit.py) under pretraining: a
checkpoint path that is a file or lacks room fails before any step, naming it; a second run on one
directory is refused, a stale lock taken over; a resume with other data is refused naming each
setting (or, allowed, starts the data afresh); a resume that only adds steps keeps the
checkpoint's learning-rate schedule; Ctrl-C saves and exits 130; a SIGTERM that lands on a
skipped (non-finite) step still saves it; held-out batches are read from the sources once. Every
step carries a manifest of digests; a flipped byte, an empty or partial step, NaN values or an
impossible data position are found, and resume falls back to the newest good step exactly (the
same rule load_checkpoint follows), setting the bad ones aside."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
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
from llama3_jax.config.data_config import parse_ramp
from llama3_jax.convert import step_integrity
from llama3_jax.data import make_pipeline
from llama3_jax.data.pipeline import check_position
from llama3_jax.train import loop
from llama3_jax.train.checkpoint_dir import LOCK_FILE
from llama3_jax.train.checkpointing import RunCheckpointer
from llama3_jax.train.metrics import MetricsOutputs
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


def _run(directory, steps, save_every=1, eval_every=0, decay_steps=None, **data_changes):
  return RunConfig(
    model=l3.get_config("tiny"),
    mesh=MeshConfig.parse("fsdp=8"),
    optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=1, decay_steps=decay_steps or steps),
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
  loop.train_run(_run(tmp_path, 4), tokenizer, metrics=MetricsOutputs(jsonl=str(metrics)))
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
    metrics=MetricsOutputs(jsonl=str(tmp_path / "metrics.jsonl")),
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


def _losses(metrics_file):
  with open(metrics_file) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _largest_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
  return max(files, key=os.path.getsize)


def test_every_step_carries_a_manifest_of_its_files(tmp_path, tokenizer):
  loop.train_run(_run(tmp_path, 2), tokenizer)
  for step in ("1", "2"):
    step_dir = tmp_path / step
    with open(step_dir / step_integrity.MANIFEST_FILE) as f:
      listed = json.load(f)["files"]
    on_disk = {
      os.path.relpath(os.path.join(root, name), step_dir)
      for root, _, names in os.walk(step_dir)
      for name in names
    } - {step_integrity.MANIFEST_FILE, *step_integrity.UNDIGESTED}
    assert set(listed) == on_disk and any(name.startswith("state/") for name in listed)
    for name, entry in listed.items():
      with open(step_dir / name, "rb") as f:
        assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert step_integrity.problem(str(step_dir)) is None


def test_a_flipped_byte_is_found_and_resume_falls_back_exactly(tmp_path, tokenizer):
  straight = tmp_path / "straight.jsonl"
  loop.train_run(_run(tmp_path / "a", 5), tokenizer, metrics=MetricsOutputs(jsonl=str(straight)))
  interrupted = tmp_path / "interrupted.jsonl"
  first_part = _run(tmp_path / "b", 4, decay_steps=5)
  loop.train_run(first_part, tokenizer, metrics=MetricsOutputs(jsonl=str(interrupted)))
  target = _largest_file(tmp_path / "b" / "4")
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    block = f.read(64)
    f.seek(-64, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in block))
  name = os.path.relpath(target, tmp_path / "b" / "4")
  assert step_integrity.problem(str(tmp_path / "b" / "4")) == (
    f"{name} differs from its digest in {step_integrity.MANIFEST_FILE} (a corrupted file)"
  )
  with pytest.raises(ValueError, match="not intact: .* differs from its digest"):
    l3.load_checkpoint(str(tmp_path / "b" / "4"))
  resumed = loop.train_run(
    _run(tmp_path / "b", 5), tokenizer, metrics=MetricsOutputs(jsonl=str(interrupted))
  )
  assert os.path.isdir(tmp_path / "b" / "rejected-step-4")  # set aside, not deleted
  assert [r["step"] for r in resumed.records] == [4, 5]  # resumed from 3
  with open(interrupted) as f:
    assert [r["step"] for r in map(json.loads, f)] == [1, 2, 3, 4, 5]  # step 4 once
  assert _losses(interrupted) == _losses(straight)  # bitwise


def test_an_empty_or_partial_newest_step_is_skipped_by_resume_and_load_alike(tmp_path, tokenizer):
  loop.train_run(_run(tmp_path, 2), tokenizer)
  os.mkdir(tmp_path / "7")  # empty
  shutil.copytree(tmp_path / "2" / "config", tmp_path / "5" / "config")  # config only
  shutil.copytree(tmp_path / "2", tmp_path / "4")  # a half-deleted step
  shutil.rmtree(tmp_path / "4" / "state" / "ocdbt.process_0")
  _, params = l3.load_checkpoint(str(tmp_path))
  _, step_2 = l3.load_checkpoint(str(tmp_path / "2"))
  jax.tree.map(np.testing.assert_array_equal, params, step_2)
  result = loop.train_run(_run(tmp_path, 3), tokenizer)
  assert result.first["step"] == 2 and result.last["step"] == 3
  assert sorted(p for p in os.listdir(tmp_path) if "step" in p) == [
    "rejected-step-4",
    "rejected-step-5",
    "rejected-step-7",
  ]


def test_non_finite_values_or_an_impossible_data_position_fall_back(tmp_path, tokenizer, caplog):
  loop.train_run(_run(tmp_path / "run", 3), tokenizer)
  nan_run = _run(tmp_path / "nan", 4)
  params = l3.init_params(nan_run.model, jax.random.key(0))
  params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
  loop.train_run(nan_run, tokenizer, init_params=params)  # every update skipped: NaN kept
  shutil.copytree(tmp_path / "nan" / "4", tmp_path / "run" / "4")  # intact, but NaN
  position_file = tmp_path / "run" / "3" / "data" / "process_0-of-1.json"
  position = json.loads(position_file.read_text())
  position["parent_window_start_state"]["parent"]["parents"][0]["next_index"] = 10**9
  position_file.write_text(json.dumps(position))
  step_integrity.write_manifest(str(tmp_path / "run" / "3"), 3)  # digests match: intact, wrong
  with pytest.raises(ValueError, match="can be resumed \\(step 4: NaN or Inf in .*final_norm"):
    loop.train_run(_run(tmp_path / "nan", 5), tokenizer)  # no step to fall back to
  assert sorted(p for p in os.listdir(tmp_path / "nan") if p[0].isdigit()) == ["2", "3", "4"]
  result = loop.train_run(_run(tmp_path / "run", 4), tokenizer)
  assert result.first["step"] == 2 and result.last["step"] == 4
  assert "next_index is 1000000000, beyond what 3 steps can reach" in caplog.text
  assert sorted(p for p in os.listdir(tmp_path / "run") if "step" in p) == [
    "rejected-step-3",
    "rejected-step-4",
  ]


def test_a_data_position_is_checked_against_closed_form_bounds(tokenizer):
  plain = DataConfig(seq_len=16, global_batch_size=8, row_shuffle_window=4)
  ramp = plain.replace(ramp=parse_ramp("300:4x32,700:8x64"))
  for data in (plain, ramp):
    batches = make_pipeline(data, tokenizer, split="train")
    for step in range(1, 9):
      next(batches)
      check_position(batches.get_state(), step, data)  # the real positions pass
  state = batches.get_state()  # the ramp's: 3 batches of 8x16, 3 of 4x32 (from 384), 2 of 8x64
  assert state["tokens"] == 8 * 16 * 3 + 4 * 32 * 3 + 8 * 64 * 2
  with pytest.raises(ValueError, match="tokens is 1792; 7 steps of this ramp read at most 1280"):
    check_position(state, 7, ramp)
  with pytest.raises(ValueError, match="pos_in_window is 2.5, not a count"):
    check_position({"pos_in_window": 2.5}, 1, plain)
  with pytest.raises(ValueError, match="pos_in_window is 5, beyond what 1 steps can reach \\(4\\)"):
    check_position({"pos_in_window": 5}, 1, plain)
