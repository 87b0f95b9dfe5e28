"""Rejection sampling: K samples decoded from one shared prefill (greedy: each equals generate's
greedy answer), scored by the reward model exactly as alone, best first; the binary writes SFT
rows with the top-scored sample, or DPO pairs of the best and the worst, on a 2 x 2 mesh."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.convert.orbax_io import save_orbax
from llama3_jax.data.chat import parse_preference_row, parse_sft_row
from llama3_jax.inference.generate import pad_prompts
from llama3_jax.posttrain.rejection import rejection_sample, sample_from_one_prefill
from llama3_jax.posttrain.reward import RewardModel, reward_params_from_lm, save_reward_model
from llama3_jax.tokenizer.chat_format import Message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = l3.Tokenizer.default()
CHAT = l3.ChatFormat(TOKENIZER)
CFG = l3.get_config("test-3.1", vocab_size=TOKENIZER.vocab_size)
PROMPT = [Message("user", "Name a colour.")]


@pytest.fixture(scope="module")
def models():
  policy = l3.init_params(CFG, jax.random.key(0))
  reward = reward_params_from_lm(l3.init_params(CFG, jax.random.key(1)), CFG, jax.random.key(2))
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


def test_binary_writes_the_best_sample_and_pairs(tmp_path, models):
  policy, reward = models
  save_orbax(str(tmp_path / "policy"), CFG, policy)
  save_reward_model(str(tmp_path / "rm"), CFG, reward)
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for question in ("Name a colour.", "Name a fruit."):
      f.write(json.dumps({"prompt": [{"role": "user", "content": question}]}) + "\n")
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "rejection_sample.py"),
      f"--checkpoint={tmp_path / 'policy'}",
      f"--reward_model={tmp_path / 'rm'}",
      f"--prompts={tmp_path / 'prompts.jsonl'}",
      f"--output={tmp_path / 'best.jsonl'}",
      f"--pairs_output={tmp_path / 'pairs.jsonl'}",
      "--samples=4",
      "--max_new_tokens=5",
      "--mesh=fsdp=2,tensor=2",
    ],
    env={
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    },
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  outputs = {
    name: [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
    for name in ("best", "pairs")
  }
  assert len(outputs["best"]) == len(outputs["pairs"]) == 2
  # The binary keeps what the library ranks first (same seeds: rng = key(0), split per prompt).
  rng = jax.random.key(0)
  for row, pair in zip(outputs["best"], outputs["pairs"]):
    rng, prompt_rng = jax.random.split(rng)
    messages = parse_sft_row(row)
    scored = rejection_sample(
      CHAT,
      CFG,
      policy,
      CFG,
      reward,
      messages[:-1],
      samples=4,
      max_new_tokens=5,
      sampling=l3.SamplingConfig(temperature=0.8, top_p=0.9),
      rng=prompt_rng,
    )
    assert messages[-1].role == "assistant" and messages[-1].content == scored[0].text
    np.testing.assert_allclose(row["rewards"], [s.reward for s in scored], rtol=0, atol=1e-5)
    preference = parse_preference_row(pair)
    assert [m.content for m in preference.ranked] == [scored[0].text, scored[-1].text]
