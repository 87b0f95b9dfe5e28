"""The post-training loop (`fit`, used by reward.py and dpo.py) on a 2 x 2 (fsdp x tensor) mesh: a
run stopped by SIGTERM saves its state, and the resumed run ends with exactly the parameters and
optimizer state of a run that was never interrupted; a resume with other data settings is refused;
NaN steps are skipped without an update, and too many in a row stop training."""

import os
import signal

import jax
import numpy as np
import optax
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.layout import Layout
from llama3_jax.posttrain.trainer import Trainer, epoch_batches, mean_metrics, with_values
from llama3_jax.train import RunCheckpointer
from llama3_jax.train.fit import FitPolicy

CFG = l3.get_config("test-3.1")
STEPS = 4
ORDER = {"data": "tokens", "batch_size": 4, "seed": 0}


def _loss(params, batch):
  """Mean next-token cross-entropy of `batch["tokens"]` [B, T], times `batch["scale"]` [B]."""
  tokens = batch["tokens"]
  logits = l3.Transformer(CFG).apply({"params": params}, tokens[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  ce = ce * batch["scale"].mean()
  return ce, {"ce": ce}


def _trainer():
  params = l3.init_params(CFG, jax.random.key(0))
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
  layout = Layout.build(CFG, mesh)
  return Trainer(with_values(l3.param_shapes(CFG), params), _loss, optax.adamw(1e-2), layout)


def _batches(sigterm_after=None, scale=1.0):
  """Batches of 4 rows of 16 random tokens; SIGTERM to this process as the batch after the first
  `sigterm_after` is drawn: the loop reads it while step `sigterm_after` runs, so the stop
  arrives during that step, as a preemption would."""
  rows = {
    "tokens": np.random.RandomState(1).randint(0, CFG.vocab_size, (12, 16)),
    "scale": np.full(12, scale, np.float32),
  }
  for drawn, batch in enumerate(epoch_batches(rows, 4, seed=0), start=1):
    yield batch
    if drawn == sigterm_after:
      os.kill(os.getpid(), signal.SIGTERM)


def _fit(trainer, batches, checkpointer=None, order=ORDER):
  evaluate = lambda params: {"ce": trainer.evaluate(next(_batches()), params)[0]}
  return trainer.fit(
    batches,
    FitPolicy(STEPS, eval_every=2, eval_at_start=True, log_every=2),
    evaluate,
    ("loss", "eval_ce"),
    CFG,
    checkpointer=checkpointer,
    run_config=order,
  )


def test_resumed_run_ends_as_the_uninterrupted_run(tmp_path):
  straight = _trainer()
  _fit(straight, _batches())

  stopped = _trainer()
  checkpointer = RunCheckpointer(str(tmp_path), save_every=100)
  _, last = _fit(stopped, _batches(sigterm_after=2), checkpointer)
  checkpointer.close()
  assert last["step"] == 2 and "eval_ce" in last
  assert sorted(os.listdir(tmp_path)) == ["2"]

  resumed = _trainer()
  checkpointer = RunCheckpointer(str(tmp_path), save_every=100)
  first, last = _fit(resumed, _batches(), checkpointer)
  checkpointer.close()
  assert (first["step"], last["step"]) == (2, STEPS)
  assert int(resumed.state.step) == STEPS
  for x, y in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)

  with pytest.raises(ValueError, match="batch_size: checkpoint 4 vs run 8"):
    _fit(_trainer(), _batches(), RunCheckpointer(str(tmp_path), 100), dict(ORDER, batch_size=8))

  # Steps with a NaN loss are skipped without an update; too many in a row stop the run.
  trained = jax.device_get(resumed.state)
  with pytest.raises(FloatingPointError, match="2 consecutive steps had a NaN/Inf loss"):
    policy = FitPolicy(5, max_nonfinite_steps=2)
    resumed.fit(_batches(scale=np.nan), policy, lambda params: {}, (), CFG)
  for x, y in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(trained.params)):
    np.testing.assert_array_equal(np.asarray(x), y)
  assert (int(resumed.state.step), int(resumed.state.nonfinite_total)) == (STEPS, 2)


def test_held_out_metrics_with_fewer_rows_than_a_batch():
  """3 held-out rows, batches of 4, 2 batch shards: one batch of 2 rows (an IndexError before);
  1 row cannot fill the 2 shards: a named error."""
  trainer = _trainer()
  rows = next(_batches())
  three = {k: v[:3] for k, v in rows.items()}
  expected = trainer.evaluate({k: v[:2] for k, v in rows.items()})[1]
  assert mean_metrics(trainer, three, 4) == pytest.approx({"ce": float(expected["ce"])}, rel=1e-6)
  with pytest.raises(ValueError, match="1 held-out rows do not fill one batch over the 2 batch"):
    mean_metrics(trainer, {k: v[:1] for k, v in rows.items()}, 4)


def test_sigterm_on_a_skipped_step_still_saves(tmp_path):
  """Every step non-finite (skipped), SIGTERM while step 2 runs: the loop stops after step 2 and
  saves it (the pretraining loop used to skip the save of a skipped step and exit without one)."""
  trainer = _trainer()
  checkpointer = RunCheckpointer(str(tmp_path), save_every=100)
  policy = FitPolicy(STEPS, max_nonfinite_steps=STEPS + 1)
  _, last = trainer.fit(
    _batches(sigterm_after=2, scale=np.nan), policy, None, (), CFG, checkpointer=checkpointer
  )
  checkpointer.close()
  assert last["step"] == 2 and last["skipped"]
  assert sorted(os.listdir(tmp_path)) == ["2"]
  assert (int(trainer.state.step), int(trainer.state.nonfinite_total)) == (0, 2)
