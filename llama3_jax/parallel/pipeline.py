"""Pipeline parallelism over the `pipeline` mesh axis: a circular schedule, optionally interleaved.

The L decoder layers are cut into S x V virtual stages of L / (S x V) consecutive layers; pipeline
rank s runs virtual stages s, S + s, ..., (V - 1) x S + s. V = 1 is GPipe; V > 1 is the paper's
interleaved schedule, whose bubble is V times smaller. The batch is cut into M micro-batches (any
M >= 1). Micro-batch m enters virtual stage v x S + s at iteration v x P + m + s, P = max(M, S).
Every rank computes at every iteration (the stage function is vmapped over a `stage` axis sharded
over `pipeline`); activations move to the next rank by one rotation of that axis (a collective
permute); when M > S, what leaves the last rank waits M - S iterations in a delay line before
re-entering rank 0 for its next virtual stage. Slots outside the schedule compute on stale data
that nothing reads (the bubble).

The embedding and the head (and the loss after it) run outside the stages on the whole batch, its
rows split over `pipeline` as well as over the batch axes when M is a multiple of S (every batch
of a multiple of M rows per batch shard then splits; the Layout decides once, parallel/layout.py),
so each rank does 1/S of that work rather than the first and last ranks carrying it (the paper
instead takes a layer off those two stages to balance them).

Parameters keep their canonical [L, ...] layout, the `layers` axis sharded over `pipeline`, so
checkpoints do not depend on the layout. With V > 1 the step regroups them by virtual stage: one
all-to-all of the layer weights per step (and of their gradients back).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model import DecoderStack, Transformer, param_shapes
from llama3_jax.parallel.rules import Rules, axes_tuple

ACT_SBTD = ("stage", "batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
  """S `stages` (the `pipeline` degree), M `micro_batches`, V virtual stages per rank (`interleave`)."""

  stages: int
  micro_batches: int
  interleave: int = 1

  def __post_init__(self):
    for field in ("stages", "micro_batches", "interleave"):
      if getattr(self, field) < 1:
        raise ValueError(f"PipelineSchedule.{field} must be >= 1, got {getattr(self, field)}")

  @property
  def period(self) -> int:
    """Iterations between a micro-batch's visits to the same rank."""
    return max(self.micro_batches, self.stages)

  @property
  def iterations(self) -> int:
    return (self.interleave - 1) * self.period + self.micro_batches + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    """Share of (rank, iteration) slots without work: (S - 1) / (V M + S - 1) when M >= S."""
    return 1.0 - self.interleave * self.micro_batches / self.iterations

  @property
  def splits_rows_over_stages(self) -> bool:
    """Whether rows in multiples of M (per batch shard) always split over the S ranks too."""
    return self.micro_batches % self.stages == 0

  def check_layers(self, n_layers: int) -> None:
    """Raises ValueError unless the layers split into the S x V virtual stages."""
    virtual = self.stages * self.interleave
    if n_layers % virtual:
      raise ValueError(
        f"{n_layers} layers do not split into {self.stages} pipeline stages x "
        f"{self.interleave} virtual stages = {virtual}"
      )

  def check(self, n_layers: int, rows: int) -> None:
    """Raises ValueError unless the layers split into the stages and the rows into micro-batches."""
    self.check_layers(n_layers)
    if rows % self.micro_batches:
      raise ValueError(f"{rows} rows do not split into {self.micro_batches} pipeline micro-batches")


def rows_over_pipeline(rules: Rules) -> Rules:
  """`rules` with the batch rows split over `pipeline` as well as over the batch axes."""
  return tuple(
    (name, axes_tuple(axes) + ("pipeline",) if name == "batch" else axes) for name, axes in rules
  )


def _stage_weights(layer_params, cfg: ModelConfig, schedule: PipelineSchedule):
  """[L, ...] layer parameters -> [S, V, L / (S V), ...]: rank s's virtual stages, in order."""
  per_stage = cfg.n_layers // (schedule.stages * schedule.interleave)
  boxed = param_shapes(cfg)["layers"]

  def regroup(box, w):
    w = w.reshape((schedule.interleave, schedule.stages, per_stage) + w.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(w, ("stage", None, None) + tuple(box.names[1:]))

  return jax.tree.map(
    regroup, boxed, layer_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )


def _run_stages(layer_params, x_MBTD, positions_MBT, segment_ids_MBT, cfg, schedule, context_order):
  """All micro-batches through all layers: [M, b, T, D] -> [M, b, T, D]."""
  S, M, V, P = schedule.stages, schedule.micro_batches, schedule.interleave, schedule.period
  weights = _stage_weights(layer_params, cfg, schedule)
  stack = DecoderStack(cfg, cfg.n_layers // (S * V), context_order)

  def stage(w_V, repeat, x_BTD, positions_BT, segment_ids_BT):
    # With one virtual stage per rank the weights are the same at every iteration; otherwise the
    # loop keeps each iteration's selection for the backward pass (fsdp-sharded, float32).
    w = jax.tree.map(lambda a: a[0] if V == 1 else a[repeat], w_V)
    return stack.apply({"params": {"layers": w}}, x_BTD, positions_BT, segment_ids_BT)

  run_stages = jax.vmap(stage, spmd_axis_name="pipeline")
  act = lambda a: nn.with_logical_constraint(a, ACT_SBTD)
  stage_ids = jnp.arange(S)
  delay = P - S
  first_rank = (stage_ids == 0)[:, None, None, None]

  def iteration(carry, t):
    outputs, delay_line, final = carry
    rotated = act(jnp.roll(outputs, 1, axis=0))  # rank s receives rank s - 1's output
    returning = rotated
    if delay:
      returning, delay_line = delay_line[t % delay], delay_line.at[t % delay].set(rotated)
    step_in = t - stage_ids  # how far each rank is into the schedule
    repeat = jnp.clip(step_in // P, 0, V - 1)
    micro = jnp.clip(step_in % P, 0, M - 1)
    fresh = x_MBTD[jnp.minimum(t % P, M - 1)][None]
    inputs = jnp.where(first_rank, jnp.where(t < P, fresh, returning), rotated)
    positions = nn.with_logical_constraint(positions_MBT[micro], ACT_SBTD[:3])
    segment_ids = nn.with_logical_constraint(segment_ids_MBT[micro], ACT_SBTD[:3])
    outputs = act(run_stages(weights, repeat, act(inputs), positions, segment_ids))
    last = t - (S - 1)  # how far the last rank is into the schedule
    finished = (last >= 0) & (last // P == V - 1) & (last % P < M)
    slot = jnp.clip(last % P, 0, M - 1)
    kept = jax.lax.dynamic_index_in_dim(final, slot, axis=1, keepdims=False)
    final = jax.lax.dynamic_update_index_in_dim(
      final, jnp.where(finished & (stage_ids == S - 1)[:, None, None, None], outputs, kept), slot, 1
    )
    return (outputs, delay_line, final), None

  zeros = jnp.zeros((S,) + x_MBTD.shape[1:], x_MBTD.dtype)
  init = (
    act(zeros),
    jnp.zeros((delay,) + zeros.shape, zeros.dtype) if delay else None,
    jnp.zeros((S,) + x_MBTD.shape, x_MBTD.dtype),
  )
  (_, _, final), _ = jax.lax.scan(iteration, init, jnp.arange(schedule.iterations))
  # Only the last rank's slots are non-zero: the sum over ranks hands its outputs to every rank.
  return jnp.sum(final, axis=0)


def pipeline_hidden(
  params, tokens_BT, positions_BT, segment_ids_BT, cfg, schedule, context_order, ends_rules: Rules
):
  """The Transformer's last hidden states [B, T, D] before the head (no cache), its layers run as
  a pipeline. The embedding and the returned states are constrained under `ends_rules` (the
  Layout's `head_rules`: the rows over the ranks too, where they split); run the head under them
  as well. `context_order`: see Transformer."""
  rows, length = tokens_BT.shape
  schedule.check(cfg.n_layers, rows)
  model = Transformer(cfg)
  # Micro-batch m takes rows m, M + m, 2M + m, ...: the rows each data shard holds stay with it.
  micro = lambda a: a.reshape((-1, schedule.micro_batches) + a.shape[1:]).swapaxes(0, 1)
  with nn.logical_axis_rules(ends_rules):
    x_BTD = model.apply({"params": params}, tokens_BT, method="embed")
  x_MBTD = nn.with_logical_constraint(micro(x_BTD), (None,) + ACT_SBTD[1:])
  y_MBTD = _run_stages(
    params["layers"],
    x_MBTD,
    micro(positions_BT),
    micro(segment_ids_BT),
    cfg,
    schedule,
    context_order,
  )
  with nn.logical_axis_rules(ends_rules):
    return nn.with_logical_constraint(y_MBTD.swapaxes(0, 1).reshape(rows, length, -1), ACT_SBTD[1:])
