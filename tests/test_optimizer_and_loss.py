"""The schedule, AdamW and the loss against closed forms and PyTorch; accumulation and the NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig, TrainConfig
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import (
  TrainState,
  cross_entropy_sums,
  learning_rate_schedule,
  loss_sums_and_grads,
  make_optimizer,
  make_train_step,
  shift_batch,
)


def test_schedule_closed_form():
  cfg = OptimizerConfig(
    peak_lr=1.0, warmup_steps=10, decay_steps=110, floor_ratio=0.01, anneal_steps=20
  )
  lr = learning_rate_schedule(cfg, total_steps=200)
  expected = {
    0: 0.0,
    5: 0.5,
    10: 1.0,
    60: (1.0 + 0.01) / 2,
    110: 0.01,
    150: 0.01,
    180: 0.01,
    190: 0.005,
    200: 0.0,
  }
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, abs=1e-6), step


@pytest.mark.parametrize("eps, weight_decay, clip_norm", [(1e-5, 0.1, 1.0), (1e-8, 0.03, 0.0)])
def test_one_adamw_step_equals_torch(eps, weight_decay, clip_norm):
  """Clipping to global norm `clip_norm` (0: none) then AdamW (decoupled decay on every
  parameter) vs torch."""
  rng = np.random.RandomState(0)
  params = {"w": rng.randn(4, 3).astype(np.float32), "b": rng.randn(3).astype(np.float32)}
  grads = {"w": 3 * rng.randn(4, 3).astype(np.float32), "b": rng.randn(3).astype(np.float32)}
  # A decay horizon so long that the learning rate stays at its peak, as torch's constant lr.
  cfg = OptimizerConfig(
    peak_lr=0.1,
    warmup_steps=0,
    decay_steps=10**9,
    weight_decay_mask="all",
    eps=eps,
    weight_decay=weight_decay,
    clip_norm=clip_norm,
  )
  tx = make_optimizer(cfg, total_steps=10)
  ours = params
  state = tx.init(params)
  torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  torch_opt = torch.optim.AdamW(
    torch_params.values(), lr=0.1, betas=(0.9, 0.95), eps=eps, weight_decay=weight_decay
  )
  for _ in range(3):
    updates, state = tx.update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
    for k, p in torch_params.items():
      p.grad = torch.tensor(grads[k])
    if clip_norm:
      torch.nn.utils.clip_grad_norm_(torch_params.values(), clip_norm)
    torch_opt.step()
  for k in params:
    np.testing.assert_allclose(ours[k], torch_params[k].detach().numpy(), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="eps > 0 and weight_decay >= 0"):
    OptimizerConfig(eps=0.0)


def test_matrices_mask_leaves_norm_scales_undecayed():
  tx = make_optimizer(OptimizerConfig(peak_lr=0.5, warmup_steps=0, decay_steps=10), total_steps=10)
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 1 - 0.5 * 0.1)
  np.testing.assert_allclose(new["scale"], 1.0)


def test_cross_entropy_equals_torch_and_z_loss_closed_form():
  rng = np.random.RandomState(1)
  logits = rng.randn(2, 5, 11).astype(np.float32) * 3
  targets = rng.randint(0, 11, (2, 5))
  valid = rng.rand(2, 5) > 0.3
  ce_sum, z_sum = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid))
  torch_targets = torch.tensor(np.where(valid, targets, -100))
  expected = torch.nn.functional.cross_entropy(
    torch.tensor(logits).reshape(-1, 11),
    torch_targets.reshape(-1),
    ignore_index=-100,
    reduction="sum",
  )
  assert float(ce_sum) == pytest.approx(float(expected), rel=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  assert float(z_sum) == pytest.approx(float((lse**2 * valid).sum()), rel=1e-5)


def test_no_target_across_documents_or_on_padding():
  batch = {
    "tokens": jnp.array([[10, 11, 12, 20, 21, 0]]),
    "positions": jnp.array([[0, 1, 2, 0, 1, 0]]),
    "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]]),
  }
  inputs, targets, valid = shift_batch(batch)
  np.testing.assert_array_equal(inputs["tokens"], [[10, 11, 12, 20, 21]])
  np.testing.assert_array_equal(targets, [[11, 12, 20, 21, 0]])
  np.testing.assert_array_equal(valid, [[True, True, False, True, False]])


CFG = l3.get_config("test-3.0")


def _one_device(train: TrainConfig) -> Layout:
  return Layout.build(CFG, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]), train)


def _batch(seed=0, rows=8, length=17):
  rng = np.random.RandomState(seed)
  segment_ids = np.repeat(np.array([[1] * 9 + [2] * 8]), rows, 0)
  positions = np.concatenate([np.arange(9), np.arange(8)])[None].repeat(rows, 0)
  return {
    "tokens": jnp.asarray(rng.randint(0, CFG.vocab_size, (rows, length))),
    "positions": jnp.asarray(positions),
    "segment_ids": jnp.asarray(segment_ids),
  }


def test_micro_batches_accumulate_to_the_full_batch_gradient():
  params = l3.init_params(CFG, jax.random.key(0))
  fn = jax.jit(loss_sums_and_grads, static_argnums=2)
  ce1, n1, g1 = fn(params, _batch(), _one_device(TrainConfig(micro_batches=1)))
  ce4, n4, g4 = fn(params, _batch(), _one_device(TrainConfig(micro_batches=4)))
  assert int(n1) == int(n4) == 8 * 15
  assert float(ce4) == pytest.approx(float(ce1), rel=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max()), g4, g1
  )


def test_nonfinite_step_is_skipped_and_counted():
  opt = OptimizerConfig(peak_lr=1e-3, warmup_steps=0, decay_steps=10)
  tx = make_optimizer(opt, 10)
  params = l3.init_params(CFG, jax.random.key(0))
  step = jax.jit(make_train_step(_one_device(TrainConfig()), tx, learning_rate_schedule(opt, 10)))
  state, metrics = step(TrainState.create(params, tx), _batch())
  assert not bool(metrics["skipped"]) and int(state.step) == 1
  poisoned = jax.tree.map(lambda x: x, state.params)
  poisoned["final_norm"]["scale"] = poisoned["final_norm"]["scale"].at[0].set(jnp.nan)
  bad_state, metrics = step(state.replace(params=poisoned), _batch(1))
  assert bool(metrics["skipped"])
  assert (int(bad_state.step), int(bad_state.nonfinite_streak), int(bad_state.nonfinite_total)) == (
    1,
    1,
    1,
  )
  jax.tree.map(np.testing.assert_array_equal, bad_state.opt_state, state.opt_state)
