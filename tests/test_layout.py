"""The Layout decides a run's parallelism once: its degrees and splits in closed form for several
meshes (real and abstract), named errors for batches and lengths that do not split (raised before
any compile), and a train step built from it that uses its degrees whatever mesh is ambient (none,
or another one) and trains like one device."""

import re

import jax
import numpy as np
import pytest
from packed_rows import packed_batches

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from llama3_jax.parallel import (
  LOGICAL_AXIS_RULES,
  PipelineSchedule,
  abstract_mesh,
  make_mesh,
  mesh_context,
)
from llama3_jax.parallel.layout import Layout
from llama3_jax.train import create_train_state, learning_rate_schedule, make_optimizer
from llama3_jax.train import train_step as train_step_module
from llama3_jax.train.plan import compiled_plan

CFG = l3.get_config("test-3.1", n_heads=8, n_kv_heads=8, ffn_dim=256)


@pytest.mark.parametrize(
  "mesh_text, devices, train, batch, context, splits, schedule, head_over_pipeline",
  [
    ("fsdp=8", 8, TrainConfig(), 8, 1, 1, None, False),
    ("data=2,fsdp=2,context=2", 8, TrainConfig(micro_batches=2), 4, 2, 2, None, False),
    ("pipeline=4,fsdp=2", 8, TrainConfig(micro_batches=2), 2, 1, 8, (4, 4, 1), True),
    (
      "pipeline=4,data=2",
      8,
      TrainConfig(pipeline_micro_batches=2, pipeline_interleave=2),
      2,
      1,
      2,
      (4, 2, 2),
      False,
    ),
    (
      "fsdp=64,pipeline=16,tensor=8",
      8192,
      TrainConfig(micro_batches=2, pipeline_micro_batches=16, pipeline_interleave=2),
      64,
      1,
      32,
      (16, 16, 2),
      True,
    ),
    (
      "data=4,fsdp=8,pipeline=16,context=16,tensor=8",
      65536,
      TrainConfig(micro_batches=2, pipeline_micro_batches=32),
      32,
      16,
      64,
      (16, 32, 1),
      True,
    ),
  ],
)
def test_degrees_and_splits(
  mesh_text, devices, train, batch, context, splits, schedule, head_over_pipeline
):
  """Real meshes over this host's 8 devices, abstract ones (no devices) beyond."""
  mesh_cfg = MeshConfig.parse(mesh_text)
  mesh = make_mesh(mesh_cfg) if devices == 8 else abstract_mesh(mesh_cfg, devices)
  layout = Layout.build(CFG, mesh, train)
  assert layout.mesh is mesh and layout.rules == LOGICAL_AXIS_RULES
  assert (layout.batch_degree, layout.context_degree, layout.batch_splits) == (
    batch,
    context,
    splits,
  )
  assert layout.pipeline_stages == mesh_cfg.pipeline
  assert layout.schedule == (schedule and PipelineSchedule(*schedule))
  assert layout.head_over_pipeline == head_over_pipeline
  head_batch = dict(layout.head_rules)["batch"]
  assert head_batch == (("data", "fsdp", "pipeline") if head_over_pipeline else ("data", "fsdp"))


def test_one_device_has_no_rules_and_a_mesh_config_takes_all_devices():
  one = Layout.build(CFG, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
  assert one.rules == () and one.head_rules == () and one.batch_degree == 1
  assert dict(Layout.build(CFG, MeshConfig.parse("fsdp=4,tensor=2")).mesh.shape)["tensor"] == 2


def test_rows_that_do_not_divide_are_named_before_any_compile():
  """The error names global_batch_size, the splits and the mesh; on an abstract mesh (which
  cannot compile) compiled_plan raises it first."""
  mesh = abstract_mesh(MeshConfig.parse("pipeline=2,fsdp=4"), 8)
  layout = Layout.build(CFG, mesh, TrainConfig(micro_batches=2, pipeline_micro_batches=4))
  layout.check_batch(32, 32)
  message = (
    "global_batch_size=24 (the stage from token 5) does not divide into 8 (pipeline) "
    "micro-batches (micro_batches=2 x pipeline micro-batches 4) over the 4 data x fsdp shards of "
    f"mesh {layout.degrees}: it needs a multiple of 32"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    layout.check_batch(24, 32, where="the stage from token 5")
  with pytest.raises(ValueError, match="global_batch_size=24 does not divide into 8"):
    compiled_plan(layout, OptimizerConfig(), DataConfig(seq_len=32, global_batch_size=24))


def test_lengths_that_do_not_split_for_context_parallelism_are_named():
  mesh = abstract_mesh(MeshConfig.parse("fsdp=2,context=4"), 8)
  layout = Layout.build(CFG, mesh, TrainConfig())
  layout.check_batch(2, 16)
  message = (
    f"seq_len=20 on mesh {layout.degrees}: Context parallelism of degree 4 needs a sequence "
    "length divisible by 2 x 4 = 8; got 20"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    layout.check_batch(2, 20)
  with pytest.raises(ValueError, match="divisible by 2 x 4 = 8; got 20"):
    compiled_plan(layout, OptimizerConfig(), DataConfig(seq_len=20, global_batch_size=2))
  # Without context parallelism any length splits.
  Layout.build(CFG, abstract_mesh(MeshConfig(fsdp=8), 8)).check_batch(8, 33)


def test_layers_that_do_not_split_into_virtual_stages_are_named():
  mesh = abstract_mesh(MeshConfig.parse("pipeline=2,fsdp=4"), 8)
  layout = Layout.build(CFG.replace(n_layers=8), mesh, TrainConfig(pipeline_interleave=3))
  with pytest.raises(ValueError, match="8 layers do not split into 2 pipeline stages x 3"):
    layout.check_layers()


OPT = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, decay_steps=10)
STEPS = 2


def _losses(layout: Layout, ambient=None):
  """Per-step losses of STEPS train steps from the Layout, called under `ambient` (a mesh or
  None), and the state's shardings against the Layout's."""
  tx = make_optimizer(OPT, STEPS)
  state, shardings = create_train_state(CFG, tx, layout.mesh, jax.random.key(0))
  step = layout.jit_train_step(tx, learning_rate_schedule(OPT, STEPS))
  losses = []
  for batch in packed_batches(STEPS, 8, 33, CFG.vocab_size):
    if ambient is None:
      state, metrics = step(state, batch)
    else:
      with mesh_context(ambient):
        state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  wq = state.params["layers"]["attention"]["wq"]
  assert wq.sharding == shardings.params["layers"]["attention"]["wq"]
  return np.array(losses)


@pytest.fixture(scope="module")
def one_device_losses():
  return _losses(Layout.build(CFG, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])))


@pytest.mark.parametrize("ambient", [None, "tensor=8"])
def test_train_step_uses_the_layouts_degrees_not_the_ambient_mesh(
  monkeypatch, one_device_losses, ambient
):
  """With no ambient mesh, or one without pipeline or context axes, the step still reorders for
  context 2, pipelines over 2 stages under the Layout's head rules, and trains like one device."""
  seen = []
  reorder, pipeline = train_step_module.reorder_for_context, train_step_module.pipeline_hidden

  def recording_reorder(tree, degree):
    seen.append(("context", degree))
    return reorder(tree, degree)

  def recording_pipeline(*args):
    seen.append(("pipeline", args[-3], args[-2], dict(args[-1])["batch"]))
    return pipeline(*args)

  monkeypatch.setattr(train_step_module, "reorder_for_context", recording_reorder)
  monkeypatch.setattr(train_step_module, "pipeline_hidden", recording_pipeline)
  layout = Layout.build(CFG, MeshConfig.parse("pipeline=2,fsdp=2,context=2"), TrainConfig())
  losses = _losses(layout, ambient and make_mesh(MeshConfig.parse(ambient)))
  assert ("context", 2) in seen
  assert ("pipeline", PipelineSchedule(2, 2), 2, ("data", "fsdp", "pipeline")) in seen
  np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)
