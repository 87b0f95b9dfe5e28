"""One post-training round of the paper end to end on the tiny preset, each binary on a 2 x 2
(fsdp x tensor) mesh of fake devices, each stage starting from the previous stage's output:
SFT on synthetic chats -> reward model from the SFT checkpoint -> rejection sampling from the SFT
policy scored by that reward model -> DPO from the SFT checkpoint on preferences plus the sampled
pairs -> Polyak average of the SFT run's last two steps with the DPO policy."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.data.chat import parse_preference_row, parse_sft_row
from llama3_jax.posttrain.rejection import rejection_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "--mesh=fsdp=2,tensor=2"
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
SYSTEM = {"role": "system", "content": "Reverse the list."}


def _run(binary: str, *flags: str) -> subprocess.CompletedProcess:
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", binary), *flags],
    env={
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    },
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _records(path) -> list:
  return [json.loads(line) for line in open(path)]


def _write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return str(path)


def _chats(n: int, seed: int):
  """The user lists colours; the assistant lists them back in reverse order."""
  rng = np.random.RandomState(seed)
  for _ in range(n):
    colours = list(rng.choice(COLOURS, rng.randint(3, 7)))
    yield [SYSTEM, {"role": "user", "content": " ".join(colours)}] + [
      {"role": "assistant", "content": " ".join(reversed(colours))}
    ]


def _preferences(n: int):
  """Chosen answers use one set of words, rejected ones another: a learnable preference."""
  rng = np.random.RandomState(0)
  good, bad = ["sunny", "warm", "bright", "calm"], ["stormy", "cold", "dark", "windy"]
  for _ in range(n):
    when = " ".join(rng.choice(["today", "tomorrow", "weekend", "morning"], 2))
    yield {
      "prompt": [{"role": "user", "content": f"Weather {when}?"}],
      "chosen": " ".join(rng.choice(good, rng.randint(2, 6))),
      "rejected": " ".join(rng.choice(bad, rng.randint(2, 6))),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  root = tmp_path_factory.mktemp("round")
  _write_jsonl(root / "prefs.jsonl", _preferences(160))
  return root


@pytest.fixture(scope="module")
def sft(work):
  """SFT from random tiny weights: (run checkpoint directory, step records, the run's stderr)."""
  data = _write_jsonl(work / "chats.jsonl", ({"messages": d} for d in _chats(400, 0)))
  done = _run(
    "sft.py",
    "--config=tiny",
    f"--data={data}",
    MESH,
    "--steps=16",
    "--global_batch_size=4",
    "--seq_len=48",
    "--lr=3e-3",
    "--eval_every=8",
    f"--checkpoint_dir={work / 'sft'}",
    "--save_every=8",
    f"--metrics_file={work / 'sft.jsonl'}",
  )
  return str(work / "sft"), _records(work / "sft.jsonl"), done.stderr


@pytest.fixture(scope="module")
def reward_model(work, sft):
  """Reward model from the SFT checkpoint: (its --output, step records, stdout)."""
  done = _run(
    "reward.py",
    f"--checkpoint={sft[0]}",
    f"--data={work / 'prefs.jsonl'}",
    MESH,
    "--steps=12",
    "--global_batch_size=8",
    "--seq_len=48",
    "--lr=1e-3",
    "--held_out_fraction=0.1",
    "--eval_every=6",
    f"--checkpoint_dir={work / 'rm_run'}",
    "--save_every=6",
    f"--output={work / 'rm'}",
    f"--metrics_file={work / 'rm.jsonl'}",
  )
  return str(work / "rm"), _records(work / "rm.jsonl"), done.stdout


@pytest.fixture(scope="module")
def rejection(work, sft, reward_model):
  """Rejection sampling from the SFT policy: (prompts, best rows, best/worst pairs)."""
  prompts = [{"prompt": dialog[:2]} for dialog in _chats(2, 1)]
  _run(
    "rejection_sample.py",
    f"--checkpoint={sft[0]}",
    f"--reward_model={reward_model[0]}",
    f"--prompts={_write_jsonl(work / 'prompts.jsonl', prompts)}",
    f"--output={work / 'best.jsonl'}",
    f"--pairs_output={work / 'pairs.jsonl'}",
    "--samples=4",
    "--max_new_tokens=6",
    "--temperature=0.8",
    MESH,
  )
  return prompts, _records(work / "best.jsonl"), _records(work / "pairs.jsonl")


@pytest.fixture(scope="module")
def dpo(work, sft, rejection):
  """DPO from the SFT checkpoint on the preferences and the sampled pairs, the reference's
  log-probs precomputed (test_dpo.py: the online reference equals them): (policy, records,
  stdout)."""
  data = _write_jsonl(work / "dpo.jsonl", list(_preferences(96)) + rejection[2])
  done = _run(
    "dpo.py",
    f"--checkpoint={sft[0]}",
    f"--data={data}",
    MESH,
    "--steps=8",
    "--global_batch_size=8",
    "--seq_len=40",
    "--lr=1e-4",
    "--eval_every=8",
    "--held_out_fraction=0.17",
    f"--metrics_file={work / 'dpo_metrics.jsonl'}",
    f"--output={work / 'policy'}",
  )
  return str(work / "policy"), _records(work / "dpo_metrics.jsonl"), done.stdout


def test_sft_lowers_held_out_loss_on_assistant_tokens(sft):
  run_dir, records, stderr = sft
  assert "'fsdp': 2, 'pipeline': 1, 'context': 1, 'tensor': 2} over 4 devices" in stderr
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 2 and evals[-1] < evals[0] - 1.0, evals
  # Targets are the assistant's tokens only: far fewer than the packed tokens of a step.
  assert all(0 < r["tokens"] < 4 * 48 / 2 for r in records)
  assert sorted(os.listdir(run_dir)) == ["16", "8", "metrics.png", "tensorboard"]


def test_reward_model_from_sft_learns_the_preference(work, reward_model):
  _, records, stdout = reward_model
  assert records[-1]["eval_accuracy"] > 0.9
  losses = [r["loss"] for r in records if "loss" in r]
  assert records[0]["step"] == 0 and "loss" not in records[0]  # held-out metrics at the start
  assert losses[-1] < losses[0]
  assert "held-out pairwise accuracy" in stdout
  assert {"12", "6"} < set(os.listdir(work / "rm_run"))  # train state saved mid-run


def test_rejection_sampling_keeps_the_top_scored_sample(sft, reward_model, rejection):
  prompts, best, pairs = rejection
  assert len(best) == len(pairs) == len(prompts)
  cfg, policy = l3.load_checkpoint(sft[0])
  reward_cfg, reward = l3.load_checkpoint(reward_model[0], kind="reward")
  chat = l3.ChatFormat(l3.Tokenizer.default())
  # The binary's seeds: rng = key(0), split once per prompt.
  rng = jax.random.key(0)
  for prompt, row, pair in zip(prompts, best, pairs):
    rng, prompt_rng = jax.random.split(rng)
    messages = parse_sft_row(row)
    scored = rejection_sample(
      chat,
      cfg,
      policy,
      reward_cfg,
      reward,
      messages[:-1],
      samples=4,
      max_new_tokens=6,
      sampling=l3.SamplingConfig(temperature=0.8, top_p=0.9),
      rng=prompt_rng,
    )
    assert [m.content for m in messages[:-1]] == [m["content"] for m in prompt["prompt"]]
    assert messages[-1].role == "assistant" and messages[-1].content == scored[0].text
    np.testing.assert_allclose(row["rewards"], [s.reward for s in scored], rtol=0, atol=1e-4)
    assert row["rewards"] == sorted(row["rewards"], reverse=True)
    preference = parse_preference_row(pair)
    assert [m.content for m in preference.ranked] == [scored[0].text, scored[-1].text]


def test_dpo_from_sft_raises_the_held_out_margin(dpo):
  policy_dir, records, stdout = dpo
  # The policy starts as the reference (margin 0); trained, the held-out chosen response gains
  # log-probability against the rejected one, relative to the reference.
  assert "held-out reward margin 0.0000 at step 0" in stdout
  assert records[-1]["eval_reward_margin"] > 0.1
  assert records[-1]["eval_reward_accuracy"] > 0.9
  cfg, policy = l3.load_checkpoint(policy_dir)
  assert cfg.name == "tiny" and set(policy) == set(l3.param_shapes(cfg))


def test_polyak_average_of_sft_steps_and_dpo_policy_on_a_mesh(work, sft, dpo):
  output = str(work / "averaged")
  done = _run(
    "average.py",
    f"--run_dir={sft[0]}",
    "--last_steps=2",
    f"--model={dpo[0]}",
    "--weights=1,1,2",
    MESH,
    f"--output={output}",
  )
  for path, weight in [(os.path.join(sft[0], "8"), 0.25), (os.path.join(sft[0], "16"), 0.25)]:
    assert f"{path}: weight {weight}" in done.stdout
  assert f"{dpo[0]}: weight 0.5" in done.stdout
  parts = [l3.load_checkpoint(os.path.join(sft[0], step))[1] for step in ("8", "16")]
  parts.append(l3.load_checkpoint(dpo[0])[1])
  cfg, averaged = l3.load_checkpoint(output)
  assert cfg.name == "tiny"
  expected = jax.tree.map(lambda a, b, c: 0.25 * a.astype(np.float64) + 0.25 * b + 0.5 * c, *parts)
  for x, y in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
