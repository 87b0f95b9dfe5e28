"""Hugging Face parity: our logits equal LlamaForCausalLM's, and HF -> ours -> HF is lossless."""

import copy
import glob
import json
import os

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama3_jax import RopeScaling, Transformer, get_config
from llama3_jax.convert import load_hf, save_hf
from hf_reference import hf_reference

PRESETS = ("test-3.0", "test-3.1", "test-3.2")
BATCH, LENGTH, START = 3, 12, 100_000  # positions far beyond the 8192-token original context
HF_CONFIG_FIELDS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "rms_norm_eps",
  "rope_parameters",
  "max_position_embeddings",
  "tie_word_embeddings",
  "hidden_act",
  "attention_bias",
  "mlp_bias",
)


def inputs(vocab_size: int):
  """tokens [B, T] and increasing positions [B, T] from beyond 100000, with gaps up to 4000 so that
  relative distances reach every RoPE frequency band (scaled, smoothed and unscaled)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size, (BATCH, LENGTH))
  positions = (
    START
    + 1000 * np.arange(BATCH)[:, None]
    + np.cumsum(rng.integers(1, 4000, (BATCH, LENGTH)), axis=1)
  )
  return tokens, positions


def hf_logits(model, tokens, positions) -> np.ndarray:
  with torch.no_grad():
    logits = model(torch.tensor(tokens), position_ids=torch.tensor(positions)).logits
  return logits.float().numpy()


def our_logits(cfg, params, tokens, positions) -> np.ndarray:
  return np.asarray(Transformer(cfg).apply({"params": params}, tokens, positions))


def read_safetensors_dir(path: str):
  tensors = {}
  for file in glob.glob(os.path.join(path, "*.safetensors")):
    tensors.update(safetensors.torch.load_file(file))
  return tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """preset -> (HF model, its save_pretrained directory, its logits on `inputs`)."""
  out = {}
  for seed, name in enumerate(PRESETS):
    model = hf_reference(get_config(name), seed)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (model, path, hf_logits(model, *inputs(model.config.vocab_size)))
  return out


@pytest.mark.parametrize("attention_impl", ["xla", "dot_product"])
@pytest.mark.parametrize("name", PRESETS)
def test_logits_match_hf(reference, name, attention_impl):
  _, path, expected = reference[name]
  cfg, params = load_hf(path, dtype="float32", attention_impl=attention_impl)
  assert cfg.rope_scaling == get_config(name).rope_scaling
  assert cfg.tie_embeddings == get_config(name).tie_embeddings
  got = our_logits(cfg, params, *inputs(cfg.vocab_size))
  assert np.abs(expected).max() > 1.0  # the comparison below is not of near-zero numbers
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["test-3.1", "test-3.2"])
def test_bfloat16_logits_are_as_close_to_float32_as_hf_bfloat16(reference, name):
  """bf16 weights and compute: our error against HF's float32 logits is within 1.5x of HF's own."""
  model, path, expected = reference[name]
  tokens, positions = inputs(model.config.vocab_size)
  hf_bf16 = hf_logits(copy.deepcopy(model).to(torch.bfloat16), tokens, positions)
  cfg, params = load_hf(path, dtype="bfloat16", param_dtype="bfloat16")
  ours_bf16 = our_logits(cfg, params, tokens, positions)
  hf_error = np.abs(hf_bf16.astype(np.float32) - expected).mean()
  our_error = np.abs(ours_bf16.astype(np.float32) - expected).mean()
  assert 0 < our_error < 1.5 * hf_error, (our_error, hf_error)


def test_wrong_rope_factor_is_detected(reference):
  """The parity check is sensitive: factor 8 instead of 32 moves the logits far beyond tolerance."""
  _, path, expected = reference["test-3.2"]
  cfg, params = load_hf(path, dtype="float32", rope_scaling=RopeScaling(factor=8.0))
  assert np.abs(our_logits(cfg, params, *inputs(cfg.vocab_size)) - expected).max() > 1e-1


def assert_same_tensors(expected, got):
  assert sorted(got) == sorted(expected)
  for name, tensor in expected.items():
    assert got[name].dtype == tensor.dtype, name
    assert torch.equal(got[name], tensor), name


def assert_same_hf_config(path_a, path_b):
  a, b = LlamaConfig.from_pretrained(path_a), LlamaConfig.from_pretrained(path_b)
  for field in HF_CONFIG_FIELDS:
    assert getattr(a, field) == getattr(b, field), field


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_is_lossless(reference, name, tmp_path):
  _, src, _ = reference[name]
  cfg, params = load_hf(src)
  save_hf(str(tmp_path), cfg, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  assert_same_tensors(read_safetensors_dir(src), read_safetensors_dir(str(tmp_path)))
  assert_same_hf_config(src, str(tmp_path))
  assert load_hf(str(tmp_path))[0] == cfg


def test_sharded_round_trip(reference, tmp_path):
  model, src, _ = reference["test-3.1"]
  cfg, params = load_hf(src)
  save_hf(str(tmp_path), cfg, params, max_shard_bytes=100_000)
  with open(tmp_path / "model.safetensors.index.json") as f:
    shard_files = set(json.load(f)["weight_map"].values())
  assert len(shard_files) > 2
  assert sorted(shard_files) == sorted(
    f for f in os.listdir(tmp_path) if f.endswith(".safetensors")
  )
  assert_same_tensors(read_safetensors_dir(src), read_safetensors_dir(str(tmp_path)))
  # Hugging Face reads the sharded checkpoint back into the same model.
  reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
  assert_same_tensors(model.state_dict(), reloaded.state_dict())
  # And so do we.
  cfg2, params2 = load_hf(str(tmp_path))
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["test-3.0", "test-3.2"])
def test_bfloat16_round_trip_is_lossless(reference, name, tmp_path):
  model, _, _ = reference[name]
  src, out = str(tmp_path / "src"), str(tmp_path / "out")
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(src)
  cfg, params = load_hf(src)
  assert cfg.param_dtype == "bfloat16"
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(params)} == {"bfloat16"}
  save_hf(out, cfg, params)
  expected = read_safetensors_dir(src)
  assert {t.dtype for t in expected.values()} == {torch.bfloat16}
  assert_same_tensors(expected, read_safetensors_dir(out))
  assert_same_hf_config(src, out)
