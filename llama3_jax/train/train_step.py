"""One optimizer step: micro-batched gradients in float32, the NaN/Inf guard and step metrics."""

import contextlib
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from llama3_jax.config import ModelConfig, TrainConfig
from llama3_jax.model import Transformer
from llama3_jax.parallel.context import context_degree, reorder_for_context
from llama3_jax.parallel.pipeline import (
  PipelineSchedule,
  pipeline_degree,
  pipeline_hidden,
  rows_over_pipeline,
)
from llama3_jax.train.loss import chunked_log_probs, log_prob_sums, shift_batch
from llama3_jax.train.train_state import TrainState


def split_micro_batches(tree, n: int):
  """[B, ...] leaves -> [n, B / n, ...]."""

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"Batch of {x.shape[0]} rows does not split into {n} micro-batches")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, tree)


def pipeline_schedule(train_cfg: TrainConfig, stages: int) -> PipelineSchedule:
  """The schedule of `train_cfg` over `stages` pipeline ranks (micro-batches default to `stages`)."""
  return PipelineSchedule(
    stages, train_cfg.pipeline_micro_batches or stages, train_cfg.pipeline_interleave
  )


def _hidden_and_head(model_cfg: ModelConfig, train_cfg: TrainConfig, context: int):
  """((params, tokens, positions, segment_ids) -> last hidden states [B, T, D], a context manager
  for the head's rules): the layers pipelined under a `pipeline` mesh axis, where the head runs
  with the rows split over the pipeline ranks too."""
  stages = pipeline_degree()
  if stages == 1:
    model = Transformer(model_cfg, context_order=context)
    hidden = lambda p, *inputs: model.apply({"params": p}, *inputs, method="hidden")
    return hidden, lambda rows: contextlib.nullcontext()
  schedule = pipeline_schedule(train_cfg, stages)
  hidden = lambda p, *inputs: pipeline_hidden(p, *inputs, model_cfg, schedule, context)
  return hidden, rows_over_pipeline


def loss_sums_and_grads(params, batch: Dict, model_cfg: ModelConfig, train_cfg: TrainConfig):
  """Summed over the batch's valid targets: (cross-entropy, number of targets, gradients of
  cross-entropy + z-loss), accumulated over micro-batches in float32. Under a mesh with context
  parallelism the sequence is first put in the load-balanced order (parallel/context.py); with
  pipeline parallelism the layers run as a pipeline (parallel/pipeline.py). The head and loss run
  over `train_cfg.loss_chunk` tokens of each row at a time (train/loss.py)."""
  context = context_degree()
  hidden, head_rules = _hidden_and_head(model_cfg, train_cfg, context)
  model = Transformer(model_cfg)

  def objective(p, micro):
    inputs, targets, valid = reorder_for_context(shift_batch(micro), context)
    x_BTD = hidden(p, inputs["tokens"], inputs["positions"], inputs["segment_ids"])
    with head_rules(x_BTD.shape[0]):
      head = lambda x: model.apply({"params": p}, x, method="head")
      log_p, lse = chunked_log_probs(head, x_BTD, targets, train_cfg.loss_chunk, context)
    ce_sum, z_sum = log_prob_sums(log_p, lse, valid)
    return ce_sum + train_cfg.z_loss_weight * z_sum, (ce_sum, jnp.sum(valid))

  def accumulate(carry, micro):
    ce_total, count_total, grads_total = carry
    (_, (ce_sum, count)), grads = jax.value_and_grad(objective, has_aux=True)(params, micro)
    grads_total = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_total, grads)
    return (ce_total + ce_sum, count_total + count, grads_total), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
  (ce_sum, count, grads), _ = jax.lax.scan(
    accumulate, init, split_micro_batches(batch, train_cfg.micro_batches)
  )
  return ce_sum, count, grads


def guarded_update(state: TrainState, grads, loss, tx: optax.GradientTransformation):
  """(new state, gradient norm, finite): the optimizer update of `state` by `grads`, or no change
  to parameters and optimizer state when the loss or the gradient norm is not finite. A
  conditional rather than a select of new and old values, so the update can run in place."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = jax.lax.cond(finite, update, lambda *old: old, state.params, state.opt_state)
  new_state = TrainState(
    step=state.step + finite.astype(jnp.int32),
    params=params,
    opt_state=opt_state,
    nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  return new_state, grad_norm, finite


def make_train_step(
  model_cfg: ModelConfig,
  train_cfg: TrainConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
) -> Callable[[TrainState, Dict], Tuple[TrainState, Dict]]:
  """A pure (state, batch) -> (state, metrics) function; jit it with the state's shardings.

  batch: `tokens`, `positions`, `segment_ids` of [B, T + 1] int32 (see `shift_batch`). A step
  whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged.
  """

  def train_step(state: TrainState, batch: Dict):
    ce_sum, count, grad_sums = loss_sums_and_grads(state.params, batch, model_cfg, train_cfg)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    loss = ce_sum / denominator
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, state.params)
    new_state, grad_norm, finite = guarded_update(state, grads, loss, tx)
    metrics = dict(
      loss=loss, grad_norm=grad_norm, lr=schedule(state.step), tokens=count, skipped=~finite
    )
    return new_state, metrics

  return train_step
