"""One optimizer step: micro-batched gradients in float32, the NaN/Inf guard and step metrics."""

from typing import TYPE_CHECKING, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llama3_jax.model import Transformer
from llama3_jax.parallel.context import reorder_for_context
from llama3_jax.parallel.pipeline import pipeline_hidden
from llama3_jax.train.loss import chunked_log_probs, log_prob_sums, shift_batch
from llama3_jax.train.train_state import TrainState

if TYPE_CHECKING:
  from llama3_jax.parallel.layout import Layout


def split_micro_batches(tree, n: int):
  """[B, ...] leaves -> [n, B / n, ...]."""

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"Batch of {x.shape[0]} rows does not split into {n} micro-batches")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, tree)


def _hidden(layout: "Layout"):
  """(params, tokens, positions, segment_ids) -> the last hidden states [B, T, D]: the layers
  pipelined when the Layout has a pipeline schedule."""
  cfg, context = layout.model, layout.context_degree
  if layout.schedule is None:
    model = Transformer(cfg, context_order=context)
    return lambda p, *inputs: model.apply({"params": p}, *inputs, method="hidden")
  return lambda p, *inputs: pipeline_hidden(
    p, *inputs, cfg, layout.schedule, context, layout.head_rules
  )


def loss_sums_and_grads(params, batch: Dict, layout: "Layout"):
  """Summed over the batch's valid targets: (cross-entropy, number of targets, gradients of
  cross-entropy + z-loss), accumulated over the Layout's micro-batches in float32. With context
  parallelism the sequence is first put in the load-balanced order (parallel/context.py); with a
  pipeline the layers run as one (parallel/pipeline.py). The head and loss run under the Layout's
  `head_rules`, over `loss_chunk` tokens of each row at a time (train/loss.py). Degrees come from
  `layout` alone, not from the mesh being traced under."""
  train_cfg, context = layout.train, layout.context_degree
  hidden = _hidden(layout)
  model = Transformer(layout.model)

  def objective(p, micro):
    inputs, targets, valid = reorder_for_context(shift_batch(micro), context)
    x_BTD = hidden(p, inputs["tokens"], inputs["positions"], inputs["segment_ids"])
    with nn.logical_axis_rules(layout.head_rules):
      head = lambda x: model.apply({"params": p}, x, method="head")
      sparse = valid if "targets" in micro else None  # SFT / pass-key rows: head on targets only
      log_p, lse = chunked_log_probs(
        head, x_BTD, targets, train_cfg.loss_chunk, context, valid_BT=sparse
      )
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
  layout: "Layout",
  tx: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
) -> Callable[[TrainState, Dict], Tuple[TrainState, Dict]]:
  """A pure (state, batch) -> (state, metrics) function of the Layout's model and train configs
  and degrees; `layout.jit_train_step` jits it with the state's shardings.

  batch: `tokens`, `positions`, `segment_ids` of [B, T + 1] int32 (see `shift_batch`). A step
  whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged.
  """

  def train_step(state: TrainState, batch: Dict):
    ce_sum, count, grad_sums = loss_sums_and_grads(state.params, batch, layout)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    loss = ce_sum / denominator
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, state.params)
    new_state, grad_norm, finite = guarded_update(state, grads, loss, tx)
    metrics = dict(
      loss=loss, grad_norm=grad_norm, lr=lr_schedule(state.step), tokens=count, skipped=~finite
    )
    return new_state, metrics

  return train_step
