"""Direct Preference Optimization as in the Llama 3 paper (Sec. 4.1.4).

The paper's choices: beta = 0.1; a response's log-probability is the sum of its token
log-probabilities with formatting tokens (headers, terminators) masked out of both the chosen and
the rejected response; an NLL term on the chosen response with coefficient 0.2, normalised per
token. Optional label smoothing gives conservative DPO:
loss = -(1 - eps) log sigmoid(beta * m) - eps log sigmoid(-beta * m).
Everything is float32.
"""

import jax.numpy as jnp
import optax


def response_sums(logps_BT, mask_BT):
  """(sum of token log-probs over the mask [B], number of masked tokens [B]), both float32.

  Positions outside the mask contribute nothing, whatever their log-probs.
  """
  logps_BT = jnp.where(mask_BT, logps_BT.astype(jnp.float32), 0.0)
  return jnp.sum(logps_BT, axis=-1), jnp.sum(mask_BT.astype(jnp.float32), axis=-1)


def _per_token_nll(chosen_nll_sum, chosen_tokens):
  """Mean over rows of the chosen response's NLL divided by its token count, float32 scalar."""
  if chosen_tokens is None:
    raise ValueError("chosen_tokens is required with chosen_nll_sum")
  tokens = jnp.maximum(jnp.asarray(chosen_tokens, jnp.float32), 1.0)
  return jnp.mean(jnp.asarray(chosen_nll_sum, jnp.float32) / tokens)


def dpo_loss(
  policy_chosen,
  policy_rejected,
  ref_chosen,
  ref_rejected,
  cfg,
  chosen_nll_sum=None,
  chosen_tokens=None,
):
  """DPO loss plus the per-token NLL regulariser on the chosen response.

  Args:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] summed log-probs of the chosen
      and rejected responses under the policy and the frozen reference model.
    cfg: a DPOConfig.
    chosen_nll_sum: [B] summed NLL of the chosen response's target tokens under the policy;
      required when cfg.nll_weight > 0.
    chosen_tokens: [B] number of those target tokens.

  Returns:
    (scalar float32 loss averaged over the batch, dict of scalar float32 metrics).
  """
  if cfg.nll_weight > 0 and chosen_nll_sum is None:
    raise ValueError("chosen_nll_sum is required when nll_weight > 0")
  policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
    jnp.asarray(x, jnp.float32) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  )
  chosen_reward = cfg.beta * (policy_chosen - ref_chosen)
  rejected_reward = cfg.beta * (policy_rejected - ref_rejected)
  reward_margin = chosen_reward - rejected_reward
  preference_loss = jnp.mean(
    optax.losses.sigmoid_binary_cross_entropy(reward_margin, 1.0 - cfg.label_smoothing)
  )
  nll = jnp.float32(0.0)
  if chosen_nll_sum is not None:
    nll = _per_token_nll(chosen_nll_sum, chosen_tokens)
  metrics = dict(
    reward_accuracy=jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
    reward_margin=jnp.mean(reward_margin),
    chosen_reward=jnp.mean(chosen_reward),
    rejected_reward=jnp.mean(rejected_reward),
    chosen_logps=jnp.mean(policy_chosen),
    rejected_logps=jnp.mean(policy_rejected),
    nll=nll,
  )
  return preference_loss + cfg.nll_weight * nll, metrics
