"""Our Orbax checkpoint format: lossless round trip, safe overwrite, config/tree mismatch errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama3_jax import Transformer, get_config, param_shapes
from llama3_jax.convert import load_checkpoint, load_orbax, save_orbax
from llama3_jax.convert.orbax_io import CONFIG_FILE


def init_params(cfg, seed: int):
  """Random numpy params of the model's tree and shapes (faster on CPU than compiling the init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: rng.normal(0.0, 0.2, s.shape).astype(s.dtype), nn.unbox(param_shapes(cfg))
  )


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name,param_dtype", [("test-3.1", "float32"), ("test-3.2", "bfloat16")])
def test_round_trip(tmp_path, name, param_dtype):
  cfg = get_config(name, param_dtype=param_dtype)
  params = jax.tree.map(jnp.asarray, init_params(cfg, 0))  # device arrays, as after training
  path = str(tmp_path / "ckpt")
  save_orbax(path, cfg, params)
  loaded_cfg, loaded = load_checkpoint(path)
  assert loaded_cfg == cfg
  assert_trees_equal(params, loaded)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) * 37 % cfg.vocab_size
  logits = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens))
  np.testing.assert_array_equal(logits(params), logits(jax.tree.map(jnp.asarray, loaded)))
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind


def test_param_dtype_override_casts(tmp_path):
  cfg = get_config("test-3.0")
  params = init_params(cfg, 1)
  save_orbax(str(tmp_path / "ckpt"), cfg, params)
  loaded_cfg, loaded = load_orbax(str(tmp_path / "ckpt"), param_dtype="bfloat16")
  assert loaded_cfg.param_dtype == "bfloat16"
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  assert_trees_equal(expected, loaded)


def test_refuses_to_overwrite(tmp_path):
  cfg = get_config("test-3.0")
  first, second = init_params(cfg, 1), init_params(cfg, 2)
  path = str(tmp_path / "ckpt")
  save_orbax(path, cfg, first)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_orbax(path, cfg, second)
  assert_trees_equal(first, load_orbax(path)[1])
  save_orbax(path, cfg, second, overwrite=True)
  assert_trees_equal(second, load_orbax(path)[1])
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_never_replaces_other_directories(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  cfg = get_config("test-3.0")
  with pytest.raises(FileExistsError, match="not a llama3_jax checkpoint"):
    save_orbax(str(tmp_path), cfg, init_params(cfg, 0), overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_interrupted_save_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
  cfg = get_config("test-3.0")
  first = init_params(cfg, 1)
  path = str(tmp_path / "ckpt")
  save_orbax(path, cfg, first)

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("interrupted mid-save")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
  with pytest.raises(KeyboardInterrupt):
    save_orbax(path, cfg, init_params(cfg, 2), overwrite=True)
  assert_trees_equal(first, load_orbax(path)[1])
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_swap_restores_the_existing_checkpoint(tmp_path, monkeypatch):
  """If moving the new checkpoint into place fails after the old one was moved aside, the old one
  is put back."""
  cfg = get_config("test-3.0")
  first = init_params(cfg, 1)
  path = str(tmp_path / "ckpt")
  save_orbax(path, cfg, first)
  rename = os.rename

  def failing_rename(src, dst):
    if os.path.basename(src).startswith(".ckpt.tmp-"):  # the finished new checkpoint
      raise OSError("disk full")
    rename(src, dst)

  monkeypatch.setattr(os, "rename", failing_rename)
  with pytest.raises(OSError, match="disk full"):
    save_orbax(path, cfg, init_params(cfg, 2), overwrite=True)
  monkeypatch.undo()
  assert_trees_equal(first, load_orbax(path)[1])
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_mismatched_config_errors(tmp_path):
  cfg = get_config("test-3.0")
  path = str(tmp_path / "ckpt")
  save_orbax(path, cfg, init_params(cfg, 0))
  with pytest.raises(
    ValueError,
    match=r"'layers/attention/wk' has shape \(2, 64, 2, 16\) .* expects "
    r"\(3, 64, 2, 16\)",
  ):
    load_orbax(path, n_layers=3)
  with pytest.raises(ValueError, match=r"unexpected tensors \['output'\]"):
    load_orbax(path, tie_embeddings=True)
  # An edited config file is caught the same way, before any array is read.
  with open(os.path.join(path, CONFIG_FILE)) as f:
    stored = json.load(f)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(dict(stored, ffn_dim=256), f)
  with pytest.raises(
    ValueError, match=r"'layers/feed_forward/w1' has shape \(2, 64, 192\) .* \(2, 64, 256\)"
  ):
    load_checkpoint(path)


def test_save_checks_params_against_config(tmp_path):
  params = init_params(get_config("test-3.0"), 0)
  with pytest.raises(ValueError, match=r"unexpected tensors \['output'\]"):
    save_orbax(str(tmp_path / "ckpt"), get_config("test-3.0", tie_embeddings=True), params)
  with pytest.raises(
    ValueError, match=r"'layers/attention/wk' has shape \(2, 64, 2, 16\) .* \(2, 64, 1, 16\)"
  ):
    save_orbax(str(tmp_path / "ckpt"), get_config("test-3.0", n_kv_heads=1), params)
  assert not os.path.exists(tmp_path / "ckpt")
