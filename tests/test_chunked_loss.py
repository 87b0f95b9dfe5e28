"""The output head and loss in token chunks equal the unchunked computation (log-probs, z-loss
terms, the loss and every gradient; with context-parallel shards too; the head on the valid
tokens only), and the step's compiled temporaries drop by at least the size of the [T, vocab]
float32 logits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packed_rows import packed_batches

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, RunConfig, TrainConfig
from llama3_jax.parallel import make_mesh, mesh_context
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import loss_sums_and_grads
from llama3_jax.train.loss import chunked_log_probs, log_prob_sums
from llama3_jax.train.plan import compiled_plan

CFG = l3.get_config("test-3.1", dtype="float32")


def _one_device(train: TrainConfig) -> Layout:
  return Layout.build(CFG, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]), train)


def _close(a, b, scale=1e-6):
  np.testing.assert_allclose(a, b, rtol=0, atol=scale * np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("only_valid", [False, True])
@pytest.mark.parametrize("chunk,shards", [(8, 1), (5, 1), (4, 2)])
def test_chunked_log_probs_and_gradients_equal_unchunked(chunk, shards, only_valid):
  """`only_valid`: the head runs on the valid tokens only (sparse rows, a row with none, a row
  with all), and the outputs are 0 elsewhere."""
  params = l3.init_params(CFG, jax.random.key(0))
  rng = np.random.RandomState(0)
  x_BTD = jnp.asarray(rng.randn(4, 36, CFG.dim), jnp.float32)
  targets = jnp.asarray(rng.randint(0, CFG.vocab_size, (4, 36)))
  valid = rng.rand(4, 36) > (0.9 if only_valid else 0.3)
  valid[2], valid[3] = False, True
  valid = jnp.asarray(valid)

  def losses(p, x, chunk):
    head = lambda h: l3.Transformer(CFG).apply({"params": p}, h, method="head")
    log_p, lse = chunked_log_probs(head, x, targets, chunk, shards, valid if only_valid else None)
    ce, z = log_prob_sums(log_p, lse, valid)
    return ce + 0.1 * z, (log_p, lse, ce, z)

  grad = jax.jit(jax.grad(losses, argnums=(0, 1), has_aux=True), static_argnums=2)
  (g_params, g_x), (log_p, lse, ce, z) = grad(params, x_BTD, chunk)
  (r_params, r_x), (r_log_p, r_lse, r_ce, r_z) = grad(params, x_BTD, 0)
  if only_valid:
    r_log_p, r_lse = r_log_p * valid, r_lse * valid
  for a, b in [(log_p, r_log_p), (lse, r_lse), (g_x, r_x)]:
    _close(a, b)
  assert float(ce) == pytest.approx(float(r_ce), rel=1e-6)
  assert float(z) == pytest.approx(float(r_z), rel=1e-6)
  jax.tree.map(_close, g_params, r_params)


def test_train_step_loss_and_gradients_equal_unchunked_with_documents_and_masked_targets():
  params = l3.init_params(CFG, jax.random.key(1))
  batch = packed_batches(1, 4, 30, CFG.vocab_size, seed=3)[0]
  batch["targets"] = (np.random.RandomState(1).rand(*batch["tokens"].shape) > 0.4).astype(np.int32)
  fn = jax.jit(loss_sums_and_grads, static_argnums=2)
  train = TrainConfig(z_loss_weight=1e-2, loss_chunk=0)
  ce, count, grads = fn(params, batch, _one_device(train))
  for chunk in (4, 7):
    layout = _one_device(dataclasses.replace(train, loss_chunk=chunk))
    ce_c, count_c, grads_c = fn(params, batch, layout)
    assert int(count_c) == int(count) > 0
    assert float(ce_c) == pytest.approx(float(ce), rel=1e-6)
    jax.tree.map(_close, grads_c, grads)


def test_chunked_loss_under_context_parallelism_equals_one_device():
  params = l3.init_params(CFG, jax.random.key(2))
  batch = packed_batches(1, 4, 33, CFG.vocab_size, seed=4)[0]
  train = TrainConfig(z_loss_weight=1e-2, loss_chunk=0)
  ce, count, grads = jax.jit(loss_sums_and_grads, static_argnums=2)(
    params, batch, _one_device(train)
  )
  mesh = make_mesh(MeshConfig.parse("fsdp=2,context=2"), jax.devices()[:4])
  layout = Layout.build(CFG, mesh, dataclasses.replace(train, loss_chunk=3))
  with mesh_context(mesh):
    ce_c, count_c, grads_c = jax.jit(functools.partial(loss_sums_and_grads, layout=layout))(
      params, batch
    )
  assert int(count_c) == int(count)
  assert float(ce_c) == pytest.approx(float(ce), rel=1e-5)
  jax.tree.map(lambda a, b: _close(a, b, 1e-5), grads_c, grads)


def test_chunked_head_drops_step_temporaries_by_the_logits_size():
  cfg = l3.get_config("tiny", attention_impl="flash")
  length = 2048

  def temporaries(chunk):
    run = RunConfig(
      model=cfg,
      mesh=MeshConfig(fsdp=1),
      data=DataConfig(seq_len=length, global_batch_size=1),
      train=TrainConfig(loss_chunk=chunk),
    )
    layout = Layout.build(cfg, make_mesh(run.mesh, jax.devices()[:1]), run.train)
    return compiled_plan(layout, run.optimizer, run.data)[0].temporaries

  logits_bytes = length * cfg.vocab_size * 4
  assert temporaries(0) - temporaries(256) > logits_bytes
