"""DPO rows and binary: chosen and rejected in one forward pass score as separate rows, formatting
tokens (headers, eot) are masked on real ChatFormat sequences, the on-the-fly reference equals the
precomputed one, and experiments/dpo.py raises the held-out margin on a 2 x 2 mesh."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.convert import load_checkpoint
from llama3_jax.data.chat import parse_preference_row
from llama3_jax.posttrain.dpo import DPOConfig, token_logps
from llama3_jax.posttrain.dpo_rows import dpo_objective, dpo_rows, response_logps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = l3.Tokenizer.default()
CHAT = l3.ChatFormat(TOKENIZER)
CFG = l3.get_config("test-3.1", vocab_size=TOKENIZER.vocab_size)
PREFERENCES = [
  parse_preference_row(
    {
      "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": q}],
      "chosen": good,
      "rejected": bad,
    }
  )
  for q, good, bad in [
    ("Weather?", "Sunny and warm all day.", "Cold."),
    ("A colour?", "Blue", "I will not answer that question at all."),
  ]
]


@pytest.fixture(scope="module")
def params():
  return l3.init_params(CFG, jax.random.key(0))


def _as_jax(rows):
  return {k: jnp.asarray(v) for k, v in rows.items()}


def test_one_forward_scores_each_response_as_its_own_row_without_formatting_tokens(params):
  rows = dpo_rows(CHAT, PREFERENCES, 64)
  chosen, rejected, counts = response_logps(params, _as_jax(rows), CFG)
  header = CHAT.encode_header("assistant")
  formatting = set(header) | {TOKENIZER.eot_id, TOKENIZER.eom_id, TOKENIZER.bos_id}
  for i, preference in enumerate(PREFERENCES):
    prompt = CHAT.encode_dialog_prompt(preference.prompt)
    for name, message, packed in (
      ("chosen", preference.ranked[0], chosen[i]),
      ("rejected", preference.ranked[-1], rejected[i]),
    ):
      marked = rows["tokens"][i][rows[name][i]].tolist()
      assert TOKENIZER.decode(marked) == message.content
      assert not formatting & set(marked)
      response = CHAT.encode_message(message)[len(header) :]
      alone = jnp.asarray([prompt + response])
      logps = token_logps(
        l3.Transformer(CFG).apply({"params": params}, alone)[:, :-1], alone[:, 1:]
      )
      content = slice(len(prompt) - 1, len(prompt) + len(response) - 2)  # predicting all but eot
      np.testing.assert_allclose(float(packed), float(logps[0, content].sum()), rtol=1e-5)
    chosen_response = CHAT.encode_message(preference.ranked[0])[len(header) :]
    assert counts[i] == len(chosen_response) - 1  # every token but the end token


def test_online_reference_equals_precomputed_and_gets_no_gradient(params):
  rows = _as_jax(dpo_rows(CHAT, PREFERENCES, 64))
  policy = jax.tree.map(lambda p: p * 1.01, params)
  ref_chosen, ref_rejected, _ = response_logps(params, rows, CFG)
  precomputed = dict(rows, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
  dpo_cfg = DPOConfig()
  loss_a, metrics_a = dpo_objective(policy, precomputed, CFG, dpo_cfg)
  loss_b, metrics_b = dpo_objective(policy, rows, CFG, dpo_cfg, reference_params=params)
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
  np.testing.assert_allclose(metrics_a["reward_margin"], metrics_b["reward_margin"], rtol=1e-5)
  grads = jax.grad(lambda r: dpo_objective(policy, rows, CFG, dpo_cfg, reference_params=r)[0])(
    params
  )
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def _preferences(path, n: int):
  rng = np.random.RandomState(0)
  good, bad = ["sunny", "warm", "bright", "calm"], ["stormy", "cold", "dark", "windy"]
  with open(path, "w") as f:
    for _ in range(n):
      row = {
        "prompt": [{"role": "user", "content": "Weather " + " ".join(rng.choice(good + bad, 2))}],
        "chosen": " ".join(rng.choice(good, rng.randint(2, 5))),
        "rejected": " ".join(rng.choice(bad, rng.randint(2, 5))),
      }
      f.write(json.dumps(row) + "\n")


def test_dpo_binary_raises_the_held_out_margin_on_a_2x2_mesh(tmp_path):
  _preferences(tmp_path / "prefs.jsonl", 96)
  metrics = tmp_path / "metrics.jsonl"
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "dpo.py"),
      "--config=tiny",
      f"--data={tmp_path / 'prefs.jsonl'}",
      "--mesh=fsdp=2,tensor=2",
      "--steps=8",
      "--batch_size=8",
      "--seq_len=40",
      "--lr=1e-4",
      "--eval_every=8",
      "--held_out_fraction=0.17",
      f"--metrics_file={metrics}",
      f"--output={tmp_path / 'policy'}",
    ],
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
  final = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
  # The policy starts equal to the reference (margin 0); trained, the held-out chosen response
  # gains log-probability against the rejected one, relative to the reference.
  assert "held-out reward margin 0.0000 before" in done.stdout
  assert final["eval_reward_margin"] > 0.1
  assert final["eval_reward_accuracy"] > 0.9
  cfg, policy = load_checkpoint(str(tmp_path / "policy"))
  assert cfg.name == "tiny" and set(policy) == set(l3.param_shapes(cfg))
