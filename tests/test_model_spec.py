"""Model specs: the reward model's parameter shapes and logical axes are its module's; its
parameters are created only in their shards (compiled memory per device against the shard sizes),
from a language model without any other allocation; trees are checked tensor by tensor."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.model.spec import LM, REWARD, reward_params_from_lm, spec_of, tree_kind
from llama3_jax.parallel import make_mesh, param_shardings

CFG = l3.get_config("test-3.1")  # every sharded dimension divides by 8


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig.parse("fsdp=8"))


def _boxed_leaves(tree):
  return jax.tree_util.tree_leaves_with_path(
    tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )


def test_reward_shapes_are_the_language_models_without_its_head_and_a_scalar_head(mesh):
  def described(tree):
    return {
      jax.tree_util.keystr(path): (box.value.shape, box.value.dtype, box.names)
      for path, box in _boxed_leaves(tree)
    }

  lm = described(LM.param_shapes(CFG))
  reward = described(REWARD.param_shapes(CFG))
  expected = {f"['backbone']{name}": v for name, v in lm.items() if name != "['output']"}
  expected["['score']"] = ((CFG.dim,), jnp.float32, ("embed",))
  assert reward == expected and "['output']" in lm
  assert LM.shardings(CFG, mesh) == param_shardings(CFG, mesh)


class _CompiledCreations:
  """Records every function jitted while active, to compile it again and read its memory."""

  def __init__(self, monkeypatch):
    self.jitted = []
    jit = jax.jit

    def recording_jit(fn, **kwargs):
      self.jitted.append(jit(fn, **kwargs))
      return self.jitted[-1]

    monkeypatch.setattr(jax, "jit", recording_jit)

  def output_bytes(self, rng):
    """Per-device output bytes of each recorded program, as XLA compiled it for `rng`."""
    return [j.lower(rng).compile().memory_analysis().output_size_in_bytes for j in self.jitted]


def _bytes_per_device(tree):
  """Closed form: the bytes of one device's shards of every leaf (sharded on fsdp only)."""
  return sum(
    np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for leaf in jax.tree.leaves(tree)
  )


def test_random_reward_params_are_created_in_their_shards(mesh, monkeypatch):
  creations = _CompiledCreations(monkeypatch)
  params = REWARD.init(CFG, mesh, jax.random.key(0))
  monkeypatch.undo()
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  (output,) = creations.output_bytes(jax.random.key(0))
  # One device's shards, and at most the output tuple's pointer (8 bytes) per leaf.
  assert 0 <= output - _bytes_per_device(params) <= 8 * len(jax.tree.leaves(params))
  assert total / 8 <= output <= 1.1 * total / 8  # only the norm scales are whole on every device
  for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(REWARD.shardings(CFG, mesh))):
    assert leaf.sharding == sharding
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 8)))
  host = jax.device_get(params)
  np.testing.assert_allclose(
    l3.RewardModel(CFG).apply({"params": params}, tokens),
    l3.RewardModel(CFG).apply({"params": host}, tokens),
    rtol=1e-6,
    atol=1e-7,
  )


def test_reward_params_from_a_sharded_language_model_create_only_the_head_shard(mesh, monkeypatch):
  lm = LM.init(CFG, mesh, jax.random.key(0))
  creations = _CompiledCreations(monkeypatch)
  rng = jax.random.key(1)
  params = reward_params_from_lm(CFG, lm, rng, mesh)
  monkeypatch.undo()
  # One program, whose output is one device's eighth of the [dim] head: nothing else is made.
  assert creations.output_bytes(rng) == [CFG.dim * 4 // 8]
  assert set(params["backbone"]) == set(lm) - {"output"}
  for name, value in params["backbone"].items():
    assert value is lm[name]  # the language model's own arrays, in their shards
  score = params["score"]
  assert score.shape == (CFG.dim,) and score.dtype == jnp.float32
  assert score.sharding == REWARD.shardings(CFG, mesh)["score"]
  # normal(std 0.02), the same draw whether made whole or in shards
  np.testing.assert_allclose(score, 0.02 * jax.random.normal(rng, (CFG.dim,)), rtol=1e-6)
  host = reward_params_from_lm(CFG, jax.device_get(lm), rng)
  np.testing.assert_allclose(host["score"], score, rtol=1e-6)


def test_shard_places_host_params_and_names_a_wrong_tree(mesh):
  host = jax.device_get(REWARD.init(CFG, mesh, jax.random.key(0)))
  placed = REWARD.shard(CFG, host, mesh)
  for leaf, expected, sharding in zip(
    jax.tree.leaves(placed), jax.tree.leaves(host), jax.tree.leaves(REWARD.shardings(CFG, mesh))
  ):
    assert leaf.sharding == sharding
    np.testing.assert_array_equal(leaf, expected)
  with pytest.raises(ValueError, match=r"missing tensors \['backbone/embedding'"):
    REWARD.shard(CFG, host["backbone"], mesh)


def test_check_names_missing_unexpected_and_misshapen_tensors():
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(REWARD.param_shapes(CFG)))
  REWARD.check(CFG, params, "These params")
  with pytest.raises(
    ValueError,
    match=r"These params does not match the language model of config test-3.1: missing tensors "
    r"\['embedding', .*'output'\], unexpected tensors \['backbone/embedding', .*'score'\]",
  ):
    LM.check(CFG, params, "These params")
  misshapen = dict(params, score=np.zeros(CFG.dim + 1, np.float32))
  with pytest.raises(
    ValueError, match=r"tensor 'score' has shape \(65,\) but the config expects \(64,\)"
  ):
    REWARD.check(CFG, misshapen, "These params")
  assert tree_kind(params) == "reward" and tree_kind(params["backbone"]) == "lm"
  assert spec_of("reward") is REWARD
  with pytest.raises(
    ValueError, match=r"Unknown model kind 'critic'; known kinds: \['lm', 'reward'\]"
  ):
    spec_of("critic")
