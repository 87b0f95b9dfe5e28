"""DPO loss, sequence log-probs, gradients and metrics against an independent float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.config import DPOConfig
from llama3_jax.posttrain.dpo import dpo_loss, response_sums
from llama3_jax.train.loss import chunked_log_probs

B, T, V = 8, 12, 17


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return np.exp(np_log_sigmoid(x))


def np_margin(logps):
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in logps)
  return (pc - rc) - (pr - rr)


def np_dpo_loss(logps, beta, label_smoothing=0.0, nll_weight=0.0, nll_sum=None, tokens=None):
  """-(1-eps) log sigmoid(beta m) - eps log sigmoid(-beta m), averaged, plus the NLL term."""
  z = beta * np_margin(logps)
  eps = label_smoothing
  loss = np.mean(-(1.0 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z))
  if nll_weight:
    loss += nll_weight * np.mean(np.asarray(nll_sum, np.float64) / np.asarray(tokens, np.float64))
  return loss


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def random_logps(seed):
  """(policy_chosen, policy_rejected, ref_chosen, ref_rejected), [B] float32 each."""
  rng = np.random.default_rng(seed)
  return tuple((-60.0 + 15.0 * rng.standard_normal(B)).astype(np.float32) for _ in range(4))


def random_nll(seed):
  """Summed chosen NLL [B] and token counts [B] of very different lengths."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 200, size=B).astype(np.float32)
  nll_sum = (tokens * rng.uniform(0.5, 3.0, size=B)).astype(np.float32)
  return nll_sum, tokens


def random_sequences(seed):
  """Logits [B, T, V], targets [B, T] and a mask [B, T] with a masked prefix and padding."""
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal((B, T, V))).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  positions = np.arange(T)
  starts = rng.integers(0, 4, size=(B, 1))
  ends = rng.integers(5, T + 1, size=(B, 1))
  mask = (positions >= starts) & (positions < ends)
  return logits, targets, mask


def np_sequence_logps(logits, targets, mask):
  picked = np.take_along_axis(np_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  return np.sum(picked * mask, axis=-1), np.sum(mask, axis=-1)


def token_logps(logits_BTV, targets_BT):
  """log p(target) [B, T] by the train step's chunked head (the logits standing in for hidden
  states, the head the identity; chunks of 3 tokens)."""
  return chunked_log_probs(lambda x: x, logits_BTV, targets_BT, 3)[0]


def sequence_logps(logits_BTV, targets_BT, mask_BT):
  """(masked sum [B], count [B]) as DPO scores a response: chunked log-probs, `response_sums`."""
  return response_sums(token_logps(logits_BTV, targets_BT), mask_BT)


def test_plain_dpo_equals_standard_loss():
  logps = random_logps(0)
  cfg = DPOConfig(beta=0.1, nll_weight=0.0, label_smoothing=0.0)
  loss, _ = dpo_loss(*logps, cfg)
  expected = -np.mean(np_log_sigmoid(0.1 * np_margin(logps)))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_beta_changes_loss_as_formula_predicts():
  logps = random_logps(1)
  losses = {
    beta: float(dpo_loss(*logps, DPOConfig(beta=beta, nll_weight=0.0))[0]) for beta in (0.1, 0.5)
  }
  for beta, loss in losses.items():
    np.testing.assert_allclose(loss, np_dpo_loss(logps, beta), rtol=1e-5)
  np.testing.assert_allclose(
    losses[0.5] - losses[0.1], np_dpo_loss(logps, 0.5) - np_dpo_loss(logps, 0.1), rtol=1e-4
  )
  assert losses[0.5] != pytest.approx(losses[0.1], rel=1e-3)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_formula(eps):
  logps = random_logps(2)
  loss, _ = dpo_loss(*logps, DPOConfig(nll_weight=0.0, label_smoothing=eps))
  np.testing.assert_allclose(float(loss), np_dpo_loss(logps, 0.1, label_smoothing=eps), rtol=1e-5)
  if eps == 0.0:
    standard = -np.mean(np_log_sigmoid(0.1 * np_margin(logps)))
    np.testing.assert_allclose(float(loss), standard, rtol=1e-5)


def test_nll_term_is_per_token_normalised():
  logps = random_logps(3)
  nll_sum, tokens = random_nll(3)
  with_nll, metrics = dpo_loss(*logps, DPOConfig(nll_weight=0.2), nll_sum, tokens)
  without_nll, _ = dpo_loss(*logps, DPOConfig(nll_weight=0.0))
  per_token = np.mean(nll_sum.astype(np.float64) / tokens)
  np.testing.assert_allclose(float(with_nll - without_nll), 0.2 * per_token, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll"]), per_token, rtol=1e-6)
  expected = np_dpo_loss(logps, 0.1, nll_weight=0.2, nll_sum=nll_sum, tokens=tokens)
  np.testing.assert_allclose(float(with_nll), expected, rtol=1e-5)


def test_nll_weight_without_nll_sum_raises():
  with pytest.raises(ValueError, match="chosen_nll_sum"):
    dpo_loss(*random_logps(4), DPOConfig(nll_weight=0.2))


def test_sequence_logps_matches_numpy_over_mask():
  logits, targets, mask = random_sequences(5)
  total, count = sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  expected_total, expected_count = np_sequence_logps(logits, targets, mask)
  assert total.shape == count.shape == (B,)
  assert total.dtype == count.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(total), expected_total, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(count), expected_count)
  per_token = token_logps(jnp.asarray(logits), jnp.asarray(targets))
  expected_per_token = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(per_token), expected_per_token, rtol=1e-5, atol=1e-6)


def test_tokens_outside_mask_do_not_change_result():
  logits, targets, mask = random_sequences(6)
  rng = np.random.default_rng(60)
  huge = rng.uniform(-1e6, 1e6, size=logits.shape).astype(np.float32)
  perturbed = np.where(mask[..., None], logits, huge)
  clean, _ = sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  noisy, _ = sequence_logps(jnp.asarray(perturbed), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(noisy), np.asarray(clean))


def test_gradient_wrt_policy_logps_matches_analytic():
  logps = random_logps(7)
  cfg = DPOConfig(beta=0.1, nll_weight=0.0)
  grad_chosen, grad_rejected = jax.grad(
    lambda pc, pr: dpo_loss(pc, pr, logps[2], logps[3], cfg)[0], argnums=(0, 1)
  )(jnp.asarray(logps[0]), jnp.asarray(logps[1]))
  expected = -0.1 * np_sigmoid(-0.1 * np_margin(logps)) / B
  assert np.all(np.isfinite(grad_chosen)) and np.all(np.isfinite(grad_rejected))
  np.testing.assert_allclose(np.asarray(grad_chosen), expected, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(grad_rejected), -expected, rtol=1e-5, atol=1e-8)


def test_gradient_through_sequence_logps_matches_analytic():
  """dL/dlogits = dL/dpolicy_chosen * mask * (onehot(target) - softmax), with huge masked logits."""
  logits, targets, mask = random_sequences(8)
  rng = np.random.default_rng(80)
  logits = np.where(mask[..., None], logits, rng.uniform(-1e6, 1e6, logits.shape)).astype(
    np.float32
  )
  _, policy_rejected, ref_chosen, ref_rejected = random_logps(8)
  cfg = DPOConfig(beta=0.1, nll_weight=0.0)

  def loss_fn(logits_BTV):
    policy_chosen, _ = sequence_logps(logits_BTV, jnp.asarray(targets), jnp.asarray(mask))
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg)[0]

  grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(logits)))
  policy_chosen, _ = np_sequence_logps(logits, targets, mask)
  margin = np_margin((policy_chosen, policy_rejected, ref_chosen, ref_rejected))
  d_policy = -0.1 * np_sigmoid(-0.1 * margin) / B
  one_hot = np.eye(V)[targets]
  expected = d_policy[:, None, None] * mask[..., None] * (one_hot - np.exp(np_log_softmax(logits)))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_metrics_match_numpy():
  logps = random_logps(9)
  nll_sum, tokens = random_nll(9)
  _, metrics = dpo_loss(*logps, DPOConfig(beta=0.1), nll_sum, tokens)
  pc, pr, rc, rr = (x.astype(np.float64) for x in logps)
  chosen_reward, rejected_reward = 0.1 * (pc - rc), 0.1 * (pr - rr)
  expected = dict(
    reward_accuracy=np.mean(chosen_reward > rejected_reward),
    reward_margin=np.mean(chosen_reward - rejected_reward),
    chosen_reward=np.mean(chosen_reward),
    rejected_reward=np.mean(rejected_reward),
    chosen_logps=np.mean(pc),
    rejected_logps=np.mean(pr),
    nll=np.mean(nll_sum / tokens),
  )
  assert set(metrics) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert 0.0 < expected["reward_accuracy"] < 1.0


def test_nll_metric_is_zero_without_nll():
  _, metrics = dpo_loss(*random_logps(10), DPOConfig(nll_weight=0.0))
  assert float(metrics["nll"]) == 0.0


@pytest.mark.parametrize(
  "field, value",
  [
    ("beta", 0.0),
    ("beta", -0.1),
    ("nll_weight", -0.2),
    ("label_smoothing", -0.1),
    ("label_smoothing", 0.5),
  ],
)
def test_invalid_config_names_field(field, value):
  with pytest.raises(ValueError, match=field):
    DPOConfig(**{field: value})


def test_config_defaults_are_the_papers():
  cfg = DPOConfig()
  assert (cfg.beta, cfg.nll_weight, cfg.label_smoothing) == (0.1, 0.2, 0.0)
  with pytest.raises(AttributeError):
    cfg.beta = 0.5
