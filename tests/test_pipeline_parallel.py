"""Pipeline parallelism: the schedule's closed forms, and loss and gradients equal to no pipeline
for 2 and 4 stages, with and without interleaving, with M = stages and 2 x stages micro-batches."""

import functools

import jax
import numpy as np
import pytest
from packed_rows import packed_batches

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, RunConfig, TrainConfig
from llama3_jax.parallel import (
  PipelineSchedule,
  batch_sharding,
  init_sharded_params,
  make_mesh,
  mesh_context,
)
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import loss_sums_and_grads
from llama3_jax.train.loop import train
from llama3_jax.train.plan import compiled_plan

# 8 layers: 4 stages x 2 virtual stages of one layer each.
CFG = l3.get_config("test-3.1", n_heads=8, n_kv_heads=8, ffn_dim=256, n_layers=8)
ROWS, ROW = 16, 33


@pytest.mark.parametrize(
  "stages, micro, interleave, iterations",
  [(4, 4, 1, 7), (4, 8, 1, 11), (4, 8, 2, 19), (2, 1, 1, 2), (4, 2, 2, 9), (4, 6, 3, 21)],
)
def test_schedule_iterations_and_bubble(stages, micro, interleave, iterations):
  schedule = PipelineSchedule(stages, micro, interleave)
  # Each micro-batch visits each of the S x V virtual stages once: V x M slots of work per rank.
  assert schedule.iterations == iterations
  assert schedule.bubble_fraction == pytest.approx(1 - interleave * micro / iterations)
  if micro >= stages:
    assert schedule.bubble_fraction == pytest.approx(
      (stages - 1) / (interleave * micro + stages - 1)
    )


def test_schedule_refuses_what_does_not_split():
  with pytest.raises(ValueError, match="8 layers do not split into 2 pipeline stages x 3"):
    PipelineSchedule(2, 2, 3).check(n_layers=8, rows=8)
  with pytest.raises(ValueError, match="10 rows do not split into 4 pipeline micro-batches"):
    PipelineSchedule(2, 4).check(n_layers=8, rows=10)
  with pytest.raises(ValueError, match="micro_batches must be >= 1"):
    PipelineSchedule(2, 0)


def loss_and_grads(model_cfg, layout: str, train_cfg: TrainConfig):
  """(cross-entropy sum, target count, gradients) of one packed batch on `layout` (8 devices) or
  on one device for the layout 'fsdp=1'."""
  devices = jax.devices()[:1] if layout == "fsdp=1" else jax.devices()
  mesh = make_mesh(MeshConfig.parse(layout), devices)
  params = init_sharded_params(model_cfg, mesh, jax.random.key(0))
  [batch] = packed_batches(1, ROWS, ROW, model_cfg.vocab_size)
  batch = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh)), batch)
  with mesh_context(mesh):
    fn = functools.partial(loss_sums_and_grads, layout=Layout.build(model_cfg, mesh, train_cfg))
    ce_sum, count, grads = jax.jit(fn)(params, batch)
  return float(ce_sum), int(count), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def no_pipeline():
  return {
    remat: loss_and_grads(CFG.replace(remat_policy=remat), "fsdp=1", TrainConfig())
    for remat in ("none", "full")
  }


@pytest.mark.parametrize(
  "layout, micro, interleave, remat",
  [
    ("pipeline=2,fsdp=4", 2, 1, "none"),
    ("pipeline=2,fsdp=4", 4, 1, "full"),
    ("pipeline=2,fsdp=4", 2, 2, "full"),
    ("pipeline=2,fsdp=2,tensor=2", 4, 2, "none"),
    ("pipeline=4,fsdp=2", 4, 1, "none"),
    ("pipeline=4,fsdp=2", 8, 1, "none"),
    ("pipeline=4,fsdp=2", 4, 2, "full"),
    ("pipeline=4,data=2", 8, 2, "none"),
  ],
)
def test_pipeline_equals_no_pipeline(no_pipeline, layout, micro, interleave, remat):
  """fp32: the summed loss to 1e-5 relative, every gradient to 1e-5 of its largest entry."""
  train_cfg = TrainConfig(pipeline_micro_batches=micro, pipeline_interleave=interleave)
  ce_sum, count, grads = loss_and_grads(CFG.replace(remat_policy=remat), layout, train_cfg)
  ref_ce_sum, ref_count, ref_grads = no_pipeline[remat]
  assert count == ref_count
  np.testing.assert_allclose(ce_sum, ref_ce_sum, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()),
    grads,
    ref_grads,
  )


def test_stages_hold_their_layers_and_pass_activations_by_permute():
  run = RunConfig(
    model=CFG,
    mesh=MeshConfig.parse("pipeline=4,fsdp=2"),
    data=DataConfig(seq_len=32, global_batch_size=8),
    train=TrainConfig(pipeline_micro_batches=4),
  )
  mesh = make_mesh(run.mesh)
  wq = init_sharded_params(CFG, mesh, jax.random.key(0))["layers"]["attention"]["wq"]
  assert {shard.data.shape[0] for shard in wq.addressable_shards} == {CFG.n_layers // 4}
  _, collectives = compiled_plan(Layout.build(CFG, mesh, run.train), run.optimizer, run.data)
  assert collectives.get("collective-permute", 0) >= 1


def test_training_refuses_a_batch_that_does_not_split_into_pipeline_micro_batches():
  run = RunConfig(
    model=CFG,
    mesh=MeshConfig.parse("pipeline=2,fsdp=4"),
    data=DataConfig(seq_len=32, global_batch_size=8),
    train=TrainConfig(steps=1, pipeline_micro_batches=4),
  )
  with pytest.raises(ValueError, match="does not divide into 4 \\(pipeline\\) micro-batches"):
    train(run, l3.Tokenizer.default())
