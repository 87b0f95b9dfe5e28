"""DPO rows: chosen and rejected in one forward pass score as separate rows, formatting tokens
(headers, eot) are masked on real ChatFormat sequences, the on-the-fly reference equals the
precomputed one, also as a frozen sharded input of the trainer on a 2 x 2 mesh. The binary runs in
test_posttrain_round.py."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.data.chat import parse_preference_row
from llama3_jax.parallel import make_mesh, shard_params
from llama3_jax.parallel.layout import Layout
from llama3_jax.config import DPOConfig
from llama3_jax.posttrain.dpo_rows import (
  dpo_objective,
  dpo_rows,
  response_logps,
  with_reference_logps,
)
from llama3_jax.posttrain.trainer import Trainer, with_values

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
      log_softmax = jax.nn.log_softmax(l3.Transformer(CFG).apply({"params": params}, alone)[:, :-1])
      logps = jnp.take_along_axis(log_softmax, alone[:, 1:, None], axis=-1)[..., 0]
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


def test_trainer_with_a_frozen_sharded_reference_equals_precomputed_on_one_device(params):
  rows = dpo_rows(CHAT, PREFERENCES, 64)
  policy = jax.tree.map(lambda p: p * 1.01, params)
  ref_chosen, ref_rejected, _ = response_logps(params, _as_jax(rows), CFG)
  precomputed = dict(_as_jax(rows), ref_chosen=ref_chosen, ref_rejected=ref_rejected)
  expected, _ = dpo_objective(policy, precomputed, CFG, DPOConfig())
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
  trainer = Trainer(
    with_values(l3.param_shapes(CFG), policy),
    functools.partial(dpo_objective, cfg=CFG, dpo_cfg=DPOConfig()),
    optax.sgd(0.0),
    Layout.build(CFG, mesh),
    frozen={"reference_params": shard_params(params, CFG, mesh)},
  )
  loss, _ = trainer.evaluate(rows)
  np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


def test_reference_logps_cover_every_row_when_rows_do_not_fill_the_last_batch(params):
  """5 rows in passes of 2 on a 2-way fsdp mesh: every row gets its own reference log-probs
  (dpo.py used to drop the row that did not fill a pass, from training too)."""
  rows = dpo_rows(CHAT, PREFERENCES * 3, 64)
  rows = {k: v[:5] for k, v in rows.items()}
  mesh = make_mesh(MeshConfig.parse("fsdp=2"), jax.devices()[:2])
  scored = with_reference_logps(rows, shard_params(params, CFG, mesh), CFG, mesh, 2)
  chosen, rejected, _ = response_logps(params, _as_jax(rows), CFG)
  assert set(scored) == set(rows) | {"ref_chosen", "ref_rejected"}
  assert all(len(v) == 5 for v in scored.values())
  chex.assert_trees_all_close(
    (scored["ref_chosen"], scored["ref_rejected"]), (chosen, rejected), rtol=1e-5
  )
