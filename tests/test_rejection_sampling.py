"""Rejection sampling: K samples decoded from one shared prefill (greedy: each equals generate's
greedy answer), scored by the reward model exactly as alone, best first. The binary runs in
test_posttrain_round.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.inference.generate import pad_prompts
from llama3_jax.model.spec import reward_params_from_lm
from llama3_jax.posttrain.rejection import rejection_sample, sample_from_one_prefill
from llama3_jax.posttrain.reward import RewardModel
from llama3_jax.tokenizer.chat_format import Message

TOKENIZER = l3.Tokenizer.default()
CHAT = l3.ChatFormat(TOKENIZER)
CFG = l3.get_config("test-3.1", vocab_size=TOKENIZER.vocab_size)
PROMPT = [Message("user", "Name a colour.")]


@pytest.fixture(scope="module")
def models():
  policy = l3.init_params(CFG, jax.random.key(0))
  reward = reward_params_from_lm(CFG, l3.init_params(CFG, jax.random.key(1)), jax.random.key(2))
  return policy, reward


def test_samples_from_one_prefill_decode_like_generate(models):
  policy, _ = models
  prompt_ids = CHAT.encode_dialog_prompt(PROMPT)
  tokens, lengths = pad_prompts([prompt_ids], len(prompt_ids))
  run = lambda sampling, samples: np.asarray(
    sample_from_one_prefill(
      policy,
      jnp.asarray(tokens),
      jnp.asarray(lengths),
      jax.random.key(3),
      cfg=CFG,
      samples=samples,
      max_new_tokens=6,
      sampling=sampling,
      stop_ids=(),
    )
  )
  greedy = run(l3.SamplingConfig(temperature=0.0), 3)
  [expected] = l3.generate(
    CFG, policy, [prompt_ids], max_new_tokens=6, sampling=l3.SamplingConfig(temperature=0.0)
  )
  assert all(row.tolist() == expected for row in greedy)
  sampled = run(l3.SamplingConfig(temperature=1.0, top_p=1.0), 4)
  assert len({tuple(row) for row in sampled}) > 1  # the samples go their own ways


def test_samples_are_scored_as_alone_and_ranked(models):
  policy, reward = models
  scored = rejection_sample(
    CHAT,
    CFG,
    policy,
    CFG,
    reward,
    PROMPT,
    samples=4,
    max_new_tokens=5,
    sampling=l3.SamplingConfig(temperature=1.0, top_p=1.0),
    rng=jax.random.key(4),
  )
  assert len(scored) == 4
  prompt_ids = CHAT.encode_dialog_prompt(PROMPT)
  for sample in scored:
    alone = jnp.asarray([prompt_ids + sample.ids])
    expected = RewardModel(CFG).apply({"params": reward}, alone)[0, -1]
    np.testing.assert_allclose(sample.reward, float(expected), rtol=0, atol=1e-5)
  rewards = [s.reward for s in scored]
  assert rewards == sorted(rewards, reverse=True)
