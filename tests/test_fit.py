"""The loop core (train/fit.py) under pretraining: a SIGTERM that lands on a skipped (non-finite)
step still saves it; held-out batches are read from the sources once however often the loop
evaluates; a step is a batch trained on, skipped ones included."""

import json
import os
import signal

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


def _run(directory, steps, eval_every=0, max_nonfinite_steps=10):
  return RunConfig(
    model=l3.get_config("tiny"),
    mesh=MeshConfig.parse("data=4,fsdp=2"),
    optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=1, decay_steps=10),
    data=DataConfig(seq_len=16, global_batch_size=8, held_out_fraction=0.05),
    train=TrainConfig(
      steps=steps,
      log_every=1,
      eval_every=eval_every,
      eval_batches=2,
      max_nonfinite_steps=max_nonfinite_steps,
    ),
    checkpoint=CheckpointConfig(directory=str(directory), save_every=100),
  )


@pytest.fixture(scope="module")
def tokenizer():
  return l3.Tokenizer.default()


def _sigterm_while_step_runs(batches, step):
  """`batches`, sending SIGTERM to this process as the batch after `step` is drawn, which the
  loop reads while step `step` runs."""
  for drawn, batch in enumerate(batches, start=1):
    if drawn == step + 1:
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch


def test_sigterm_on_a_skipped_pretraining_step_saves_it(tmp_path, tokenizer):
  run = _run(tmp_path, steps=6)
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
  result = loop.train_run(_run(tmp_path, steps=3, eval_every=1), tokenizer)
  assert reads.count("eval") == 1
  assert result.last["step"] == 3 and result.last["eval_loss"] > 0
