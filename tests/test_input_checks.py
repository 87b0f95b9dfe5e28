"""Inputs a user gets wrong are refused by name: sampling parameters that are not finite or not
whole (a NaN temperature used to emit token 0 forever with rc 0), mesh degrees that are not
numbers."""

import os
import subprocess
import sys

import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig

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


def test_generate_refuses_a_nan_temperature():
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", "generate.py"), "--prompt=hi"]
    + ["--temperature=nan", "--max_new_tokens=4"],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode != 0
  assert "SamplingConfig.temperature must be >= 0, got nan" in done.stderr
