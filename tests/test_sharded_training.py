"""Every parallel layout trains exactly like a single device: per-step losses, gradients, parameters."""

import functools

import jax
import numpy as np
import pytest
from packed_rows import packed_batches

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig, TrainConfig
from llama3_jax.parallel import batch_sharding, make_mesh, mesh_context
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import (
  create_train_state,
  learning_rate_schedule,
  loss_sums_and_grads,
  make_optimizer,
)

# 8 heads, 8 kv heads, ffn 256 and vocab 512 all divide tensor=8; embed 64 divides fsdp=8; rows of
# 32 inputs split into 2 x 4 chunks for context=4, with documents crossing the chunk boundaries.
CFG = l3.get_config("test-3.1", n_heads=8, n_kv_heads=8, ffn_dim=256)
TRAIN = TrainConfig(steps=3, micro_batches=2)
OPT = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, decay_steps=10)
BATCH, ROW = 8, 33


def train(mesh_cfg: MeshConfig, devices):
  """(losses per step, gradients of the first batch, final parameters) on a mesh of `devices`."""
  mesh = make_mesh(mesh_cfg, devices)
  layout = Layout.build(CFG, mesh, TRAIN)
  tx = make_optimizer(OPT, TRAIN.steps)
  state, shardings = create_train_state(CFG, tx, mesh, jax.random.key(0))
  data_sharding = batch_sharding(mesh)
  batches = [
    jax.tree.map(lambda x: jax.device_put(x, data_sharding), b)
    for b in packed_batches(3, BATCH, ROW, CFG.vocab_size)
  ]
  with mesh_context(mesh):
    grads_fn = jax.jit(functools.partial(loss_sums_and_grads, layout=layout))
    _, _, grads = grads_fn(state.params, batches[0])
    step = layout.jit_train_step(tx, learning_rate_schedule(OPT, TRAIN.steps))
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert (
    state.params["layers"]["attention"]["wq"].sharding
    == shardings.params["layers"]["attention"]["wq"]
  )
  to_host = lambda tree: jax.tree.map(np.asarray, tree)
  return np.array(losses), to_host(grads), to_host(state.params)


@pytest.fixture(scope="module")
def single_device():
  return train(MeshConfig(fsdp=1), jax.devices()[:1])


@pytest.mark.parametrize(
  "layout",
  [
    "fsdp=8",
    "tensor=8",
    "fsdp=4,tensor=2",
    "data=2,fsdp=2,tensor=2",
    "fsdp=4,context=2",
    "fsdp=2,context=4",
    "fsdp=2,context=2,tensor=2",
  ],
)
def test_layout_matches_single_device(single_device, layout):
  """fp32 throughout; sharded reductions sum in a different order, so losses agree to 1e-5
  relative, gradients to 1e-5 of each tensor's largest entry, parameters after 3 Adam steps
  (lr 1e-2) to 1e-5 absolute."""
  assert len(jax.devices()) == 8
  losses, grads, params = train(MeshConfig.parse(layout), jax.devices())
  ref_losses, ref_grads, ref_params = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()),
    grads,
    ref_grads,
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params, ref_params)
