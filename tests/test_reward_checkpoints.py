"""Reward-model checkpoints: a reward-model training run's steps (RunCheckpointer, TrainState of a
reward tree, with or without the recorded kind) and our format written by `save_orbax(kind=
"reward")` (reward.py --output) load with `load_checkpoint`, on the host and in shards, and score
exactly as the params that were saved; wrong kinds and mismatched trees are named."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig
from llama3_jax.convert import checkpoint_kind, load_checkpoint, save_orbax
from llama3_jax.convert.orbax_io import CONFIG_FILE
from llama3_jax.model.spec import REWARD
from llama3_jax.parallel import make_mesh
from llama3_jax.train import RunCheckpointer, TrainState, make_optimizer

CFG = l3.get_config("test-3.1")
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 10)))


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])


@pytest.fixture(scope="module")
def params(mesh):
  """Reward params as training leaves them: in their shards."""
  return REWARD.init(CFG, mesh, jax.random.key(0))


def _rewards(params):
  return np.asarray(l3.RewardModel(CFG).apply({"params": jax.device_get(params)}, TOKENS))


def _assert_same_model(loaded, params, mesh=None):
  expected = jax.device_get(params)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), loaded, expected)
  np.testing.assert_allclose(_rewards(loaded), _rewards(params), rtol=1e-6)
  if mesh is None:
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  else:
    shardings = jax.tree.leaves(REWARD.shardings(CFG, mesh))
    assert [x.sharding for x in jax.tree.leaves(loaded)] == shardings


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, params):
  """A reward run's checkpoints: step 1 without the kind recorded (older runs), step 2 with it."""
  directory = str(tmp_path_factory.mktemp("rm_run"))
  tx = make_optimizer(OptimizerConfig(warmup_steps=1, decay_steps=10), 10)
  checkpointer = RunCheckpointer(directory, save_every=1)
  for step, extra in ((1, {}), (2, {"model_kind": "reward"})):
    state = TrainState.create(jax.tree.map(lambda x, s=step: x * s, params), tx)
    checkpointer.save(step, state, None, {"model": CFG.to_dict(), "seed": 0, **extra})
  checkpointer.wait()
  checkpointer.close()
  return directory


def test_a_reward_run_loads_on_the_host_and_in_shards(run_dir, params, mesh):
  assert checkpoint_kind(run_dir) == checkpoint_kind(os.path.join(run_dir, "1")) == "reward"
  cfg, newest = load_checkpoint(run_dir, kind="reward")  # the run's newest step
  assert cfg == CFG
  _assert_same_model(newest, jax.tree.map(lambda x: 2 * x, params))
  _, first = load_checkpoint(os.path.join(run_dir, "1"), mesh=mesh, kind="reward")
  _assert_same_model(first, params, mesh)
  _, either = load_checkpoint(os.path.join(run_dir, "1"), kind=None)
  _assert_same_model(either, params)


def test_a_reward_run_is_not_a_language_model(run_dir):
  with pytest.raises(
    ValueError, match=r"holds a reward model \(kind 'reward'\), not the 'lm' kind .* kind='reward'"
  ):
    load_checkpoint(run_dir)
  with pytest.raises(
    ValueError,
    match=r"'backbone/layers/attention/wk' has shape \(2, 64, 2, 16\) .* \(2, 64, 1, 16\)",
  ):
    load_checkpoint(run_dir, kind="reward", n_kv_heads=1)


def test_our_format_round_trips_a_sharded_reward_model(tmp_path, params, mesh):
  path = str(tmp_path / "rm")
  save_orbax(path, CFG, params, kind="reward")  # as reward.py --output writes it
  with open(os.path.join(path, CONFIG_FILE)) as f:
    assert json.load(f)["model_kind"] == "reward"
  assert checkpoint_kind(path) == "reward"
  cfg, loaded = load_checkpoint(path, kind="reward")
  assert cfg == CFG
  _assert_same_model(loaded, params)
  _assert_same_model(load_checkpoint(path, mesh=mesh, kind="reward")[1], params, mesh)
  with pytest.raises(ValueError, match=r"holds a reward model .* not the 'lm' kind"):
    load_checkpoint(path)
  lm_path = str(tmp_path / "lm")
  save_orbax(lm_path, CFG, l3.init_params(CFG, jax.random.key(1)))
  assert checkpoint_kind(lm_path) == "lm"
  with pytest.raises(ValueError, match=r"holds a language model \(kind 'lm'\), not the 'reward'"):
    load_checkpoint(lm_path, kind="reward")
  with pytest.raises(ValueError, match=r"Unknown model kind 'critic' requested"):
    load_checkpoint(lm_path, kind="critic")


def test_mismatched_or_corrupt_reward_trees_are_named(tmp_path, params):
  with pytest.raises(
    ValueError,
    match=r"Params to save does not match the language model .* missing tensors \['embedding'",
  ):
    save_orbax(str(tmp_path / "wrong"), CFG, params)  # a reward tree saved as a language model
  assert not os.path.exists(tmp_path / "wrong")
  path = str(tmp_path / "rm")
  save_orbax(path, CFG, params, kind="reward")
  with open(os.path.join(path, CONFIG_FILE)) as f:
    stored = json.load(f)
  for kind, error in (
    ("lm", r"records model_kind 'lm', but its params are a reward model's .*'backbone', 'score'"),
    ("critic", r"Unknown model kind 'critic' recorded in Checkpoint .* known kinds"),
  ):
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(dict(stored, model_kind=kind), f)
    with pytest.raises(ValueError, match=error):
      load_checkpoint(path, kind=None)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(dict(stored, dim=128), f)
  with pytest.raises(
    ValueError, match=r"tensor 'score' has shape \(64,\) but the config expects \(128,\)"
  ):
    load_checkpoint(path, kind="reward")
