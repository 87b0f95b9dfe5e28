"""Run checkpoints: an interrupted save never hides the last good one; only the newest are kept;
their params read back as a model checkpoint, on the host or in shards; a step saved before
manifests is read unverified."""

import os
import shutil

import jax
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig
from llama3_jax.convert.orbax_io import load_run_checkpoint
from llama3_jax.convert.step_integrity import MANIFEST_FILE
from llama3_jax.parallel import make_mesh, param_shardings
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


def test_load_checkpoint_reads_the_params_of_a_run_step_on_the_host_or_in_shards(tmp_path):
  state, _ = _state()
  checkpointer = RunCheckpointer(str(tmp_path), save_every=1)
  for step in (1, 2):
    checkpointer.save(
      step,
      state.replace(params=jax.tree.map(lambda x: x * step, state.params)),
      None,
      {"model": CFG.to_dict()},
    )
  checkpointer.wait()
  checkpointer.close()
  expected = jax.device_get(state.params)
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
  cfg, newest = l3.load_checkpoint(str(tmp_path))  # the run directory: its newest step
  _, first = l3.load_checkpoint(str(tmp_path / "1"), mesh=mesh)
  assert cfg == CFG
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, 2 * y), newest, expected)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), first, expected)
  for leaf, sharding in zip(jax.tree.leaves(first), jax.tree.leaves(param_shardings(CFG, mesh))):
    assert leaf.sharding == sharding
  shutil.rmtree(tmp_path / "2" / "state")
  with pytest.raises(FileNotFoundError, match="no training-run checkpoint"):
    load_run_checkpoint(str(tmp_path / "2"))


def test_a_step_saved_before_manifests_is_read_unverified_one_after_is_not(tmp_path):
  state, _ = _state()
  progress = {"started": 0.0, "productive_s": 0.0, "restarts": 0}
  checkpointer = RunCheckpointer(str(tmp_path), save_every=1)
  checkpointer.save(1, state, None, {"model": CFG.to_dict()})  # as older runs saved it
  checkpointer.save(2, state, None, {"model": CFG.to_dict(), "progress": progress})
  checkpointer.close()
  for step in ("1", "2"):
    os.remove(tmp_path / step / MANIFEST_FILE)
  cfg, _ = l3.load_checkpoint(str(tmp_path / "1"))
  assert cfg == CFG
  with pytest.raises(ValueError, match=f"{tmp_path / '2'} is not intact: no {MANIFEST_FILE}"):
    l3.load_checkpoint(str(tmp_path / "2"))
  assert l3.load_checkpoint(str(tmp_path))[0] == CFG  # the run directory: falls back to step 1
