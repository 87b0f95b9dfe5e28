"""The reward model: packed multi-response rows score exactly as separate rows; the Bradley-Terry
loss over every implied pair equals its closed form; initialisation from a language model. The
binary runs in test_posttrain_round.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.model.spec import reward_params_from_lm
from llama3_jax.posttrain.reward import RewardModel, bradley_terry_loss, pack_responses

CFG = l3.get_config("test-3.1")


@pytest.fixture(scope="module")
def params():
  lm = l3.init_params(CFG, jax.random.key(0))
  return reward_params_from_lm(CFG, lm, jax.random.key(1))


def test_params_are_the_backbone_of_the_language_model_and_a_scalar_head(params):
  lm = l3.init_params(CFG, jax.random.key(0))
  assert set(params) == {"backbone", "score"} and params["score"].shape == (CFG.dim,)
  assert set(params["backbone"]) == set(lm) - {"output"}
  np.testing.assert_array_equal(params["backbone"]["embedding"], lm["embedding"])
  # The backbone's hidden states are what the language model's head projects.
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 12)))
  hidden = l3.Transformer(CFG).apply({"params": lm}, tokens, method="features")
  logits = l3.Transformer(CFG).apply({"params": lm}, tokens)
  np.testing.assert_allclose(hidden @ lm["output"], logits, rtol=0, atol=1e-5)
  rewards = RewardModel(CFG).apply({"params": params}, tokens)
  np.testing.assert_allclose(rewards, hidden @ params["score"], rtol=0, atol=1e-5)


def test_packed_responses_score_exactly_as_separate_rows(params):
  rng = np.random.RandomState(0)
  prompt = rng.randint(0, CFG.vocab_size, 9).tolist()
  responses = [rng.randint(0, CFG.vocab_size, n).tolist() for n in (5, 8, 3)]
  row, score_at = pack_responses(prompt, responses, length=32)
  packed = RewardModel(CFG).apply({"params": params}, *(jnp.asarray(row[k])[None] for k in row))[
    0, score_at
  ]
  for k, response in enumerate(responses):
    alone = jnp.asarray([prompt + response])
    expected = RewardModel(CFG).apply({"params": params}, alone)[0, -1]
    np.testing.assert_allclose(packed[k], expected, rtol=0, atol=1e-5)
  # Without the branch ids the later responses would see the earlier ones and score differently.
  no_branches = RewardModel(CFG).apply(
    {"params": params}, *(jnp.asarray(row[k])[None] for k in ("tokens", "positions", "segment_ids"))
  )[0, score_at]
  assert abs(float(no_branches[2] - packed[2])) > 1e-4
  with pytest.raises(ValueError, match="take 25 tokens; the row holds 20"):
    pack_responses(prompt, responses, length=20)


def _numpy_bradley_terry(rewards, counts):
  losses, wins = [], []
  for row, n in zip(rewards.astype(np.float64), counts):
    for i in range(n):
      for j in range(i + 1, n):
        losses.append(np.logaddexp(0.0, -(row[i] - row[j])))  # -log sigmoid(r_i - r_j)
        wins.append(row[i] > row[j])
  return np.mean(losses), np.mean(wins)


def test_bradley_terry_loss_over_every_implied_pair():
  rng = np.random.RandomState(0)
  rewards = rng.normal(size=(6, 3)).astype(np.float32) * 2
  counts = np.array([3, 2, 3, 2, 2, 3])  # edited > chosen > rejected, or chosen > rejected
  loss, accuracy = bradley_terry_loss(jnp.asarray(rewards), jnp.asarray(counts))
  expected_loss, expected_accuracy = _numpy_bradley_terry(rewards, counts)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(float(accuracy), expected_accuracy, rtol=1e-6)
  grads = jax.grad(lambda r: bradley_terry_loss(r, jnp.asarray(counts))[0])(jnp.asarray(rewards))
  assert np.isfinite(np.asarray(grads)).all()
  assert not np.asarray(grads)[counts == 2, 2].any()  # a missing edited response gets no gradient
