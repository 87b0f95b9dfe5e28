"""Mesh construction, the divisibility checks and parameters created directly in their shards."""

import dataclasses

import jax
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig, OptimizerConfig
from llama3_jax.parallel import check_divisibility, init_sharded_params, make_mesh, shard_params
from llama3_jax.parallel.mesh import device_grid
from llama3_jax.train import create_train_state, make_optimizer


def test_parse_and_resolve_degrees():
  assert MeshConfig.parse("fsdp=4,tensor=2") == MeshConfig(fsdp=4, tensor=2)
  assert MeshConfig.parse("tensor=2").resolved(8) == MeshConfig(fsdp=4, tensor=2)
  assert MeshConfig.parse("data=-1,tensor=4").resolved(8) == MeshConfig(data=2, fsdp=1, tensor=4)
  mesh = make_mesh(MeshConfig.parse("data=2,fsdp=2,tensor=2"))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, pipeline=1, context=1, tensor=2)


@pytest.mark.parametrize(
  "text,message",
  [
    ("fsdp=3", r"use 3 devices, but there are 8"),
    ("fsdp=-1,tensor=3", r"fixed mesh degrees \(3 devices\) do not divide the 8 devices"),
    ("fsdp=-1,data=-1", "At most one mesh axis may be -1"),
    ("tensr=2", "Bad mesh item 'tensr=2'"),
    ("data=3,fsdp=1,dcn_data=2", "data=3 is not divisible by dcn_data=2"),
  ],
)
def test_bad_degrees_are_named(text, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(MeshConfig.parse(text))


def test_kv_heads_that_do_not_divide_tensor_are_named():
  cfg = l3.get_config("test-3.1")  # 2 kv heads
  with pytest.raises(
    ValueError,
    match=r"layers/attention/wk: its 'kv_heads' dimension of size 2 is not "
    r"divisible by mesh axes \('tensor',\) of degree 4",
  ):
    check_divisibility(cfg, make_mesh(MeshConfig.parse("fsdp=2,tensor=4")))


def test_sharded_init_equals_unsharded_init_and_is_sharded():
  cfg = l3.get_config("test-3.1", n_heads=8, n_kv_heads=4, ffn_dim=256)
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=4"))
  sharded = init_sharded_params(cfg, mesh, jax.random.key(3))
  reference = l3.init_params(cfg, jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, sharded, reference)
  wq = sharded["layers"]["attention"]["wq"]  # [layers, embed, heads, head_dim]
  assert wq.addressable_shards[0].data.shape == (2, 32, 2, 8)
  placed = shard_params(jax.tree.map(np.asarray, reference), cfg, mesh)
  assert placed["embedding"].sharding == sharded["embedding"].sharding


@dataclasses.dataclass(frozen=True)
class _SliceDevice:
  """Stands in for an accelerator of a multi-slice job: only ids and slice indices matter here."""

  id: int
  slice_index: int
  process_index: int = 0
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_dcn_data_spreads_the_data_axis_over_slices():
  devices = [_SliceDevice(i, slice_index=i // 4) for i in range(8)]
  grid = device_grid(MeshConfig.parse("data=2,fsdp=2,tensor=2,dcn_data=2"), devices)
  assert grid.shape == (2, 2, 1, 1, 2)
  for replica in range(2):
    assert {d.slice_index for d in grid[replica].flat} == {replica}


def test_train_state_from_converted_weights_is_sharded_and_unchanged():
  cfg = l3.get_config("test-3.1", n_heads=8, n_kv_heads=4, ffn_dim=256)
  host = jax.tree.map(np.asarray, l3.init_params(cfg, jax.random.key(5)))
  tx = make_optimizer(OptimizerConfig(warmup_steps=1, decay_steps=10), 10)
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=4"))
  state, shardings = create_train_state(cfg, tx, mesh, jax.random.key(0), params=host)
  jax.tree.map(np.testing.assert_array_equal, state.params, host)
  mu = state.opt_state[1][0].mu["layers"]["feed_forward"]["w1"]  # AdamW's first moment
  assert mu.sharding == shardings.params["layers"]["feed_forward"]["w1"]
  assert mu.addressable_shards[0].data.shape == (2, 32, 64)
