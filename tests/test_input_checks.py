"""Inputs a user gets wrong are refused by name: sampling parameters that are not finite or not
whole (a NaN temperature used to emit token 0 forever with rc 0), token ids that are not integers
(they were truncated), rows longer than the model's context, mesh degrees that are not numbers; every binary prints a user's mistake as
one line and exits 2."""

import os
import subprocess
import sys

import jax
import pytest

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, RunConfig
from llama3_jax.config.data_config import parse_ramp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "fields, named",
  [
    (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
    (dict(temperature=float("inf")), "temperature must be finite, got inf"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_k=2.5), "top_k must be a whole number, got 2.5"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
  ],
)
def test_bad_sampling_parameters_are_named(fields, named):
  with pytest.raises(ValueError, match=f"SamplingConfig.{named}"):
    l3.SamplingConfig(**fields)


def test_a_mesh_degree_that_is_not_a_number_is_named():
  with pytest.raises(ValueError, match="Bad mesh item 'fsdp=abc': the degree 'abc' is not a whole"):
    MeshConfig.parse("fsdp=abc")


def test_rows_longer_than_the_model_are_refused():
  model = l3.get_config("tiny")  # max_seq_len 2048
  RunConfig(model=model, data=DataConfig(seq_len=2048))
  with pytest.raises(
    ValueError, match="rows of 4096 tokens .* exceed the model's max_seq_len 2048"
  ):
    RunConfig(model=model, data=DataConfig(seq_len=4096))
  ramp = DataConfig(seq_len=512, ramp=parse_ramp("1e6:8x100000"))
  with pytest.raises(
    ValueError, match="rows of 100000 tokens \\(data.seq_len of the stage from token 1000000\\)"
  ):
    RunConfig(model=model, data=ramp)


def test_token_ids_that_are_not_integers_are_refused_not_truncated():
  cfg = l3.get_config("test-3.0")
  params = l3.init_params(cfg, jax.random.key(0))
  for prompts, stops, named in [
    ([[1, 2.7, 3]], (), "Prompt 0 must be a sequence of integer token ids, got float64"),
    (
      [[1, 2], [[3, 4]]],
      (),
      "Prompt 1 must be a sequence of integer token ids, got int64 values of shape \\(1, 2\\)",
    ),
    ([[1, 2]], (5.5,), "stop_ids must be a sequence of integer token ids, got float64"),
    ([[1, 2]], (600,), "stop_ids has token ids \\[600\\] outside the vocabulary \\[0, 512\\)"),
  ]:
    with pytest.raises(ValueError, match=named):
      l3.generate(cfg, params, prompts, max_new_tokens=2, stop_ids=stops)


def _binary(name, *flags):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", name), *flags],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
  )


@pytest.mark.parametrize(
  "binary, flags, named",
  [
    (
      "generate.py",
      ["--prompt=hi", "--temperature=nan"],
      "SamplingConfig.temperature must be >= 0, got nan",
    ),
    ("pretrain.py", ["--steps=abc"], "flag --steps=abc: invalid literal for int()"),
    (
      "convert.py",
      ["--checkpoint=/no/such/dir", "--output=/tmp/unused-out", "--to=hf"],
      "/no/such/dir",
    ),
    (
      "dry_run.py",
      ["--config=tiny", "--mesh=fsdp=3", "--devices=3", "--global_batch_size=8", "--seq_len=16"],
      "global_batch_size",
    ),
  ],
)
def test_a_users_mistake_is_one_line_and_status_2(binary, flags, named):
  done = _binary(binary, *flags)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{binary}: error: ") and named in last, last
