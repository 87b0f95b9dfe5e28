"""Presets against the published parameter totals, and config validation errors."""

import pytest

import llama3_jax as l3
from llama3_jax.config import meta_ffn_dim

PUBLISHED_TOTALS = {
  "llama3-8b": 8_030_261_248,
  "llama3.1-8b": 8_030_261_248,
  "llama3-70b": 70_553_706_496,
  "llama3.1-70b": 70_553_706_496,
  "llama3.1-405b": 405_853_388_800,
  "llama3.2-1b": 1_235_814_400,
  "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_preset_parameter_totals_equal_published(name):
  assert l3.count_params(l3.get_config(name)) == PUBLISHED_TOTALS[name]


@pytest.mark.parametrize(
  "dim,multiplier,multiple_of,expected",
  [
    (4096, 1.3, 1024, 14336),
    (8192, 1.3, 4096, 28672),
    (16384, 1.2, 4096, 53248),
    (2048, 1.5, 256, 8192),
    (3072, 1.0, 256, 8192),
  ],
)
def test_meta_ffn_rule_gives_published_hidden_sizes(dim, multiplier, multiple_of, expected):
  assert meta_ffn_dim(dim, multiplier, multiple_of) == expected


def test_rope_scaling_per_family():
  assert l3.get_config("llama3-8b").rope_scaling is None
  assert l3.get_config("llama3.1-405b").rope_scaling.factor == 8
  assert l3.get_config("llama3.2-1b").rope_scaling.factor == 32
  assert (
    l3.get_config("llama3.2-3b").tie_embeddings and not l3.get_config("llama3.1-8b").tie_embeddings
  )


def test_unknown_preset_lists_known_ones():
  with pytest.raises(ValueError, match="Unknown model preset 'llama9-7b'.*llama3.1-8b"):
    l3.get_config("llama9-7b")


@pytest.mark.parametrize(
  "changes,message",
  [
    (dict(n_heads=5), "dim=64 is not divisible by n_heads=5"),
    (dict(n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(attention_impl="flash3"), "attention_impl must be one of"),
    (dict(remat_policy="some"), "remat_policy must be one of"),
  ],
)
def test_invalid_config_fields_are_named(changes, message):
  with pytest.raises(ValueError, match=message):
    l3.get_config("test-3.1", **changes)


def test_config_dict_round_trip_and_unknown_field():
  cfg = l3.get_config("llama3.2-1b")
  assert l3.ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match=r"Unknown ModelConfig fields \['n_experts'\]"):
    l3.ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 8})
