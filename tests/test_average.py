"""Model averaging: checkpoint and in-memory averages against numpy references, on a mesh, errors.
The binary runs in test_posttrain_round.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.convert import save_orbax
from llama3_jax.parallel import make_mesh, param_shardings
from llama3_jax.posttrain.averaging import average_checkpoints, average_params


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(config, [path], [params]) of three random test-3.1 models saved in our Orbax format."""
  cfg = l3.get_config("test-3.1")
  root = tmp_path_factory.mktemp("averaging")
  paths, trees = [], []
  for seed, name in enumerate("abc"):
    params = jax.tree.map(np.asarray, l3.init_params(cfg, jax.random.key(seed)))
    save_orbax(str(root / name), cfg, params)
    paths.append(str(root / name))
    trees.append(params)
  return cfg, paths, trees


def weighted_reference(trees, fractions):
  """sum_i fractions[i] * trees[i], leaf by leaf, in float64."""
  return jax.tree.map(
    lambda *leaves: sum(f * np.asarray(x, np.float64) for f, x in zip(fractions, leaves)), *trees
  )


def assert_trees_close(actual, expected, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol)


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_uniform_average_of_three_checkpoints_is_the_numpy_mean(checkpoints):
  cfg, paths, trees = checkpoints
  averaged_cfg, averaged = average_checkpoints(paths)
  assert averaged_cfg == cfg
  expected = jax.tree.map(lambda *leaves: np.mean(np.stack(leaves).astype(np.float64), 0), *trees)
  assert_trees_close(averaged, expected)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(averaged))


def test_weighted_average_is_the_weighted_sum(checkpoints):
  _, paths, trees = checkpoints
  _, averaged = average_checkpoints(paths[:2], weights=(1, 3))
  assert_trees_close(averaged, weighted_reference(trees[:2], (0.25, 0.75)))


def test_weights_are_normalised(checkpoints):
  _, paths, _ = checkpoints
  assert_trees_equal(
    average_checkpoints(paths[:2], weights=(2, 6))[1],
    average_checkpoints(paths[:2], weights=(1, 3))[1],
  )


def test_average_of_a_checkpoint_with_itself_is_that_checkpoint(checkpoints):
  _, paths, trees = checkpoints
  assert_trees_equal(average_checkpoints([paths[0], paths[0]])[1], trees[0])


def test_average_params_keeps_bfloat16_jax_leaves_and_matches_numpy():
  shapes = {"layers": {"attention": {"wq": (2, 4, 3)}}, "scale": (5,)}
  rng = np.random.default_rng(0)
  trees = [
    jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s), jnp.bfloat16),
      shapes,
      is_leaf=lambda node: isinstance(node, tuple),
    )
    for _ in range(3)
  ]
  averaged = average_params(trees, weights=[0.5, 0.0, 1.5])
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(averaged))
  expected = weighted_reference(trees, (0.25, 0.0, 0.75))
  expected_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), expected)
  assert_trees_equal(averaged, expected_bf16)


def test_average_params_names_mismatched_parameters_and_shapes():
  base = {"layers": {"attention": {"wq": np.zeros((2, 3)), "wk": np.zeros(2)}}}
  renamed = {"layers": {"attention": {"wv": np.zeros((2, 3)), "wk": np.zeros(2)}}}
  reshaped = {"layers": {"attention": {"wq": np.zeros((2, 4)), "wk": np.zeros(2)}}}
  with pytest.raises(ValueError, match=r"missing \['layers/attention/wq'\].*'layers/attention/wv'"):
    average_params([base, renamed])
  with pytest.raises(ValueError, match=r"'layers/attention/wq' has shape \(2, 4\).*\(2, 3\)"):
    average_params([base, reshaped])
  with pytest.raises(ValueError, match="at least one params tree"):
    average_params([])


def test_mismatched_architectures_name_the_field_and_both_values(checkpoints, tmp_path):
  cfg, paths, _ = checkpoints
  deeper_cfg = l3.get_config("test-3.1", n_layers=cfg.n_layers + 1)
  deeper = str(tmp_path / "deeper")
  save_orbax(deeper, deeper_cfg, l3.init_params(deeper_cfg, jax.random.key(7)))
  with pytest.raises(ValueError, match="mismatched architectures") as error:
    average_checkpoints([paths[0], deeper])
  message = str(error.value)
  assert deeper in message and paths[0] in message
  assert f"n_layers ({deeper_cfg.n_layers} vs {cfg.n_layers})" in message


@pytest.mark.parametrize(
  "weights,problem",
  [((1, -1), "non-negative"), ((1, 2, 3), "3 weights for 2"), ((0, 0), "sum to zero")],
)
def test_bad_weights_name_the_problem(checkpoints, weights, problem):
  _, paths, _ = checkpoints
  with pytest.raises(ValueError, match=problem):
    average_checkpoints(paths[:2], weights=weights)


def test_missing_path_raises_file_not_found(checkpoints, tmp_path):
  _, paths, _ = checkpoints
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=missing):
    average_checkpoints([paths[0], missing])


def test_average_on_a_mesh_is_sharded_and_equals_the_host_average(checkpoints):
  cfg, paths, _ = checkpoints
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
  _, sharded = average_checkpoints(paths, weights=(1, 2, 3), mesh=mesh)
  _, host = average_checkpoints(paths, weights=(1, 2, 3))
  assert_trees_close(sharded, host, atol=0)
  for leaf, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(param_shardings(cfg, mesh))):
    assert leaf.sharding == sharding
