"""Pipeline-parallel inference (paper Sec. 6.1): the L decoder layers cut into S stages of L / S
consecutive layers over the `pipeline` ranks, each rank holding its layers' weights and KV cache;
the rows cut into M micro-batches that follow each other through the stages (GPipe: micro-batch m
is at stage s at iteration m + s, so with M >= S every rank works once the first S - 1
iterations have filled the pipeline). Prefill and every decode step run this way.

As in training (parallel/pipeline.py), the stage function is vmapped over a `stage` axis sharded
over `pipeline`, activations move to the next rank by a rotation of that axis, and parameters
and cache keep their canonical [L, ...] layout with `layers` over `pipeline`. The embedding and
the head run on the whole batch outside the stages.
"""

from typing import Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model import DecoderStack, param_shapes
from llama3_jax.model.kv_cache import CACHE_KV_AXES
from llama3_jax.parallel.pipeline import ACT_SBTD, PipelineSchedule

CACHE_STAGE_AXES = ("stage", None) + CACHE_KV_AXES[1:]  # [S, L / S, B, slots, kv heads, head_dim]


def check_pipeline_model(cfg: ModelConfig, schedule: PipelineSchedule) -> None:
  """ValueError unless `cfg`'s layers split into the schedule's stages (one uniform stack)."""
  if cfg.quantization is not None:
    raise ValueError(
      f"Pipeline-parallel generation runs one uniform layer stack; the {cfg.quantization} model "
      f"{cfg.name} keeps its first and last layers apart: generate it without pipeline stages"
    )
  if schedule.interleave != 1:
    raise ValueError("Pipeline-parallel generation runs one stage per rank (interleave 1)")
  schedule.check_layers(cfg.n_layers)


def pipelined_layers(cfg: ModelConfig, layer_params: Dict, schedule: PipelineSchedule) -> Callable:
  """A Transformer `run_layers` (x [B, T, D], cache (k, v) [L, B, S, ...], positions, mask,
  cache_index) -> (x, cache) that runs the layers `layer_params` [L, ...] as a pipeline over
  `schedule.stages` ranks with `schedule.micro_batches` micro-batches (B must split into them:
  micro-batch m holds rows m, M + m, 2M + m, ..., so each batch shard keeps its rows)."""
  check_pipeline_model(cfg, schedule)
  S, M = schedule.stages, schedule.micro_batches
  per_stage = cfg.n_layers // S
  stack = DecoderStack(cfg, per_stage)
  by_stage = lambda a: a.reshape((S, per_stage) + a.shape[1:])
  weights = jax.tree.map(
    lambda box, w: nn.with_logical_constraint(by_stage(w), ("stage", None) + tuple(box.names[1:])),
    param_shapes(cfg)["layers"],
    layer_params,
    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
  )

  def run(x_BTD, cache_kv, positions_BT, mask, cache_index):
    rows = x_BTD.shape[0]
    schedule.check(cfg.n_layers, rows)
    b = rows // M
    micro = lambda a: a.reshape((b, M) + a.shape[1:]).swapaxes(0, 1)  # [B, ...] -> [M, b, ...]
    x_MbTD, positions_MbT, mask_M = micro(x_BTD), micro(positions_BT), jax.tree.map(micro, mask)
    # A stage's cache [L / S, B, ...] with its rows as [L / S, b, M, ...]: micro-batch m at m.
    rows_by_micro = lambda c: c.reshape(c.shape[:1] + (b, M) + c.shape[2:])

    def stage(w, k, v, x_bTD, m, active):
      at_m = lambda a: jax.lax.dynamic_index_in_dim(a, m, axis=0, keepdims=False)
      pick = lambda c: jax.lax.dynamic_index_in_dim(rows_by_micro(c), m, 2, keepdims=False)
      y_bTD, (k_m, v_m) = stack.apply(
        {"params": {"layers": w}},
        x_bTD,
        at_m(positions_MbT),
        jax.tree.map(at_m, mask_M),
        (pick(k), pick(v)),
        cache_index,
        method="with_cache",
      )

      def put(c, new):  # only a stage at work writes its micro-batch's cache rows
        kept = jnp.where(active, new, pick(c))
        return jax.lax.dynamic_update_index_in_dim(rows_by_micro(c), kept, m, 2).reshape(c.shape)

      return y_bTD, put(k, k_m), put(v, v_m)

    run_stages = jax.vmap(stage, spmd_axis_name="pipeline")
    act = lambda a: nn.with_logical_constraint(a, ACT_SBTD)
    on_stages = lambda c: nn.with_logical_constraint(c, CACHE_STAGE_AXES)
    stage_ids = jnp.arange(S)
    first_rank = (stage_ids == 0)[:, None, None, None]

    def iteration(carry, t):
      outputs, k, v, final = carry
      micro_at = t - stage_ids  # the micro-batch at each stage
      active = (micro_at >= 0) & (micro_at < M)
      fresh = jax.lax.dynamic_index_in_dim(x_MbTD, jnp.minimum(t, M - 1), 0)
      inputs = act(jnp.where(first_rank, fresh, jnp.roll(outputs, 1, axis=0)))
      outputs, k, v = run_stages(weights, k, v, inputs, jnp.clip(micro_at, 0, M - 1), active)
      done = t - (S - 1)  # the micro-batch leaving the last stage
      finished = jax.lax.dynamic_update_index_in_dim(final, outputs[S - 1], jnp.maximum(done, 0), 0)
      return (act(outputs), on_stages(k), on_stages(v), jnp.where(done >= 0, finished, final)), None

    init = (
      act(jnp.zeros((S,) + x_MbTD.shape[1:], x_BTD.dtype)),
      *(on_stages(by_stage(c)) for c in cache_kv),
      jnp.zeros_like(x_MbTD),
    )
    (_, k, v, final), _ = jax.lax.scan(iteration, init, jnp.arange(M + S - 1))
    y_BTD = final.swapaxes(0, 1).reshape(x_BTD.shape)
    return y_BTD, tuple(c.reshape(whole.shape) for c, whole in zip((k, v), cache_kv))

  return run
