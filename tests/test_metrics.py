"""Metrics outputs (train/metrics.py) and curves (train/curves.py, experiments/plot.py): their
defaults beside a run's checkpoints; a JSON-lines file keeps one record per step across a resume
and survives a line cut off by a crash; a W&B run (offline mode, read back from its .wandb log)
holds every record at its step; curves of several runs are drawn to a PNG. The kill-and-resume
run of test_pretrain checks the JSON lines and TensorBoard (EventAccumulator) of a real resume."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from llama3_jax.train.curves import plot_curves
from llama3_jax.train.metrics import (
  JsonLinesWriter,
  MetricsOutputs,
  WandbWriter,
  read_records,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(steps, loss0=10.0):
  return [
    {"step": s, "loss": loss0 - s, "lr": 1e-3 * s, "tokens_per_s": 100.0 + s, "skipped": False}
    for s in steps
  ]


def test_outputs_default_beside_the_checkpoints_and_can_be_turned_off(tmp_path):
  run = tmp_path / "run"
  outputs = MetricsOutputs.beside(str(run))
  assert outputs.jsonl == str(run / "metrics.jsonl")
  assert outputs.tensorboard_dir == str(run / "tensorboard")
  assert outputs.wandb_project is None and outputs.wandb_run.startswith("run-")
  assert MetricsOutputs.beside(str(run)).wandb_run == outputs.wandb_run  # stable: a resume's id
  assert MetricsOutputs.beside(str(tmp_path / "other")).wandb_run != outputs.wandb_run
  off = MetricsOutputs.beside(str(run), jsonl="", tensorboard_dir="")
  assert (off.jsonl, off.tensorboard_dir) == (None, None)
  assert MetricsOutputs.beside(None) == MetricsOutputs()
  given = MetricsOutputs.beside(None, jsonl=str(tmp_path / "m.jsonl"))
  assert given.jsonl == str(tmp_path / "m.jsonl") and given.tensorboard_dir is None


def test_jsonl_keeps_one_record_per_step_across_a_resume(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  first = JsonLinesWriter(path, resumed_step=0)
  for record in _records(range(1, 6)):
    first.write(record)
  first.close()
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')  # a write cut off by a kill
  resumed = JsonLinesWriter(path, resumed_step=3)  # the checkpoint resumed from
  for record in _records(range(4, 8), loss0=20.0):
    resumed.write(record)
  resumed.close()
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines] == list(range(1, 8))
  assert [r["loss"] for r in lines] == [9.0, 8.0, 7.0, 16.0, 15.0, 14.0, 13.0]
  assert read_records(path) == lines
  fresh = JsonLinesWriter(path, resumed_step=0)  # a new run on the same file replaces it
  fresh.write({"step": 1, "loss": float("nan")})
  fresh.close()
  assert read_records(path) == [{"step": 1, "loss": None}]


def _wandb_history(run_dir):
  """{step: {key: value}} of the history records of the W&B run log (LevelDB log format: a 7-byte
  header, 32 KiB blocks of records, each a 7-byte header: crc32, length, type) in `run_dir`."""
  from wandb.proto import wandb_internal_pb2

  [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  history, pending, offset, block = {}, b"", 7, 32768
  while offset + 7 <= len(data):
    if block - offset % block < 7:  # a block's tail too short for a header is padding
      offset += block - offset % block
      continue
    _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
    pending += data[offset + 7 : offset + 7 + length]
    offset += 7 + length
    if kind in (1, 4):  # a FULL record, or the LAST part of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      if record.WhichOneof("record_type") == "history":
        items = {
          item.key or "/".join(item.nested_key): item.value_json for item in record.history.item
        }
        history[int(items["_step"])] = {k: json.loads(v) for k, v in items.items()}
  return history


def test_wandb_run_holds_every_record_at_its_step(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = WandbWriter("llama3-jax-test", "run-0001", 0, {"model": {"name": "tiny"}})
  records = [{"step": 0, "eval_loss": 11.5}] + _records(range(1, 4))
  for record in records:
    writer.write(record)
  writer.write(_records([2])[0])  # a step the run already holds is not logged again
  writer.close()
  [run_dir] = glob.glob(str(tmp_path / "wandb" / "offline-run-*-run-0001"))
  history = _wandb_history(run_dir)
  assert sorted(history) == [0, 1, 2, 3]
  assert history[0]["eval_loss"] == 11.5
  for record in records[1:]:
    logged = history[record["step"]]
    assert {k: logged[k] for k in ("loss", "lr", "tokens_per_s", "skipped")} == {
      "loss": record["loss"],
      "lr": record["lr"],
      "tokens_per_s": record["tokens_per_s"],
      "skipped": 0.0,
    }


def test_curves_of_several_runs_and_the_plot_binary(tmp_path):
  from matplotlib import image

  path = str(tmp_path / "two.png")
  runs = {"a": _records(range(1, 50)), "b": _records(range(1, 20), loss0=12.0)}
  runs["a"].append({"step": 49, "eval_loss": 3.0})
  plot_curves(runs, path)
  height, width = image.imread(path).shape[:2]
  assert width > 2.5 * height  # three panels side by side
  plot_curves(runs, path, metrics=("loss",))
  height, width = image.imread(path).shape[:2]
  assert width < 1.6 * height
  with pytest.raises(ValueError, match=r"No run holds any of the metrics \['accuracy'\]"):
    plot_curves(runs, path, metrics=("accuracy",))

  run_dir = tmp_path / "run"
  run_dir.mkdir()
  with open(run_dir / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in runs["a"])
  with open(tmp_path / "b.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in runs["b"])
  output = tmp_path / "curves.png"
  plot = os.path.join(REPO, "experiments", "plot.py")
  done = subprocess.run(
    [sys.executable, plot, f"--runs={run_dir},short={tmp_path / 'b.jsonl'}", f"--output={output}"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert output.stat().st_size > 10_000 and "run: 49 steps, short: 19 steps" in done.stderr
  missing = subprocess.run(
    [sys.executable, plot, f"--runs={tmp_path / 'nowhere'}", f"--output={output}"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
    f"plot.py: error: --runs {tmp_path / 'nowhere'}: no metrics file {tmp_path / 'nowhere'}"
  ]
