"""Model structure: logical axes on every parameter, and a program size that does not grow with depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import llama3_jax as l3


def test_every_parameter_has_logical_axes_of_its_rank():
  cfg = l3.get_config("test-3.0")
  boxed = l3.param_shapes(cfg)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == 12  # embedding, output, final norm, 9 stacked layer tensors
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
  layers = boxed["layers"]
  assert layers["attention"]["wq"].names == ("layers", "embed", "heads", "head_dim")
  assert layers["attention"]["wk"].names == ("layers", "embed", "kv_heads", "head_dim")
  assert layers["feed_forward"]["w2"].names == ("layers", "mlp", "embed")
  assert boxed["embedding"].names == ("vocab", "embed")
  assert layers["attention"]["wq"].value.shape == (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.head_dim)


def _program_size(cfg):
  params = nn.unbox(l3.param_shapes(cfg))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  lowered = jax.jit(lambda p, t: l3.Transformer(cfg).apply({"params": p}, t)).lower(params, tokens)
  return len(lowered.as_text())


def test_scanned_layers_keep_the_program_size_independent_of_depth():
  cfg = l3.get_config("test-3.0", remat_policy="full")
  shallow, deep = _program_size(cfg.replace(n_layers=2)), _program_size(cfg.replace(n_layers=32))
  assert abs(deep - shallow) < 0.02 * shallow


def test_input_shape_errors_name_the_argument():
  cfg = l3.get_config("test-3.0")
  params = nn.unbox(l3.param_shapes(cfg))
  model = l3.Transformer(cfg)
  tokens = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, length\], got shape \(8,\)"):
    jax.eval_shape(lambda p: model.apply({"params": p}, tokens[0]), params)
  with pytest.raises(
    ValueError, match=r"positions has shape \(1, 8\); expected the tokens' shape \(2, 8\)"
  ):
    jax.eval_shape(lambda p: model.apply({"params": p}, tokens, positions=tokens[:1]), params)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 7\)"):
    jax.eval_shape(lambda p: model.apply({"params": p}, tokens, segment_ids=tokens[:, 1:]), params)
