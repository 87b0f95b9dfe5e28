"""Run checkpoints: an interrupted save never hides the last good one; only the newest are kept."""

import os
import shutil

import jax
import numpy as np

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig
from llama3_jax.parallel import make_mesh
from llama3_jax.train import (
  RunCheckpointer,
  abstract_train_state,
  create_train_state,
  make_optimizer,
)

CFG = l3.get_config("test-3.0")


def _state():
  tx = make_optimizer(OptimizerConfig(warmup_steps=1, decay_steps=10), 10)
  mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
  state, _ = create_train_state(CFG, tx, mesh, jax.random.key(0))
  return state, abstract_train_state(CFG, tx, mesh)


def test_interrupted_save_leaves_the_last_good_checkpoint(tmp_path):
  state, abstract = _state()
  checkpointer = RunCheckpointer(str(tmp_path), save_every=5)
  checkpointer.save(5, state, None, {"model": CFG.to_dict()})
  checkpointer.wait()
  checkpointer.close()
  # A save of step 10 killed half way: Orbax writes into a temporary directory first.
  partial = tmp_path / "10.orbax-checkpoint-tmp-1234"
  shutil.copytree(tmp_path / "5", partial)
  for root, _, files in os.walk(partial):
    for name in files[: len(files) // 2]:
      os.remove(os.path.join(root, name))
  reopened = RunCheckpointer(str(tmp_path), save_every=5)
  assert reopened.latest_step() == 5
  restored, config = reopened.restore(5, abstract, None)
  assert config["model"]["dim"] == CFG.dim
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
  state, _ = _state()
  checkpointer = RunCheckpointer(str(tmp_path), save_every=1, keep=2)
  for step in (1, 2, 3, 4):
    checkpointer.save(step, state, None, {"model": CFG.to_dict()})
  checkpointer.wait()
  checkpointer.close()
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [3, 4]
