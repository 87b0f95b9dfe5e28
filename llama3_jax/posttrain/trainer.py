"""Training any parameter pytree with a loss on a mesh: the state (parameters and AdamW moments)
created in its shards, a jitted step with the NaN/Inf guard of the pretraining step, and a loop
that logs, evaluates, checkpoints and resumes. Used by the reward model and DPO, whose batches
and losses differ from next-token prediction."""

import json
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama3_jax.config import ModelConfig, TrainConfig
from llama3_jax.parallel import batch_sharding, logical_shardings, mesh_context
from llama3_jax.train.checkpointing import RunCheckpointer, StopRequest, check_resumable
from llama3_jax.train.train_state import TrainState
from llama3_jax.train.train_step import guarded_update

# loss(params, batch, **frozen) -> (scalar loss, metrics dict of scalars)
LossFn = Callable[[Dict, Dict], Tuple[jnp.ndarray, Dict]]


class Trainer:
  """`boxed` are the parameters with their logical axes (`nn.LogicallyPartitioned` leaves, e.g. a
  Flax `init`'s output) and their values (host or device arrays, placed leaf by leaf into their
  shards); `step(batch)` trains on a dict of [B, ...] arrays split over the mesh's batch axes and
  returns the step's metrics. `frozen` are keyword arguments of `loss_fn` that are read but not
  trained (e.g. DPO's reference model, already placed on the mesh), passed to every step as
  arguments rather than compiled into it."""

  def __init__(
    self,
    boxed: Dict,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    frozen: Optional[Dict] = None,
  ):
    self.mesh, self._frozen = mesh, frozen or {}
    abstract = jax.eval_shape(lambda: TrainState.create(boxed, tx))
    self.shardings = logical_shardings(abstract, mesh)
    params = jax.tree.map(jax.device_put, nn.unbox(boxed), self.shardings.params)
    with mesh_context(mesh):
      self.state = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=self.shardings)(params)
    self._batch_sharding = batch_sharding(mesh)

    def train_step(state: TrainState, batch: Dict, frozen: Dict):
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, **frozen
      )
      new_state, grad_norm, finite = guarded_update(state, grads, loss, tx)
      return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=~finite)

    self._step = jax.jit(train_step, out_shardings=(self.shardings, None), donate_argnums=0)
    self._evaluate = jax.jit(lambda params, batch, frozen: loss_fn(params, batch, **frozen))

  def _place(self, batch: Dict) -> Dict:
    """This process's rows of every [B, ...] array, split over the batch axes."""
    rows = self._batch_sharding.spec[0]
    return {
      k: jax.make_array_from_process_local_data(
        NamedSharding(self.mesh, PartitionSpec(rows, *[None] * (v.ndim - 1))), v
      )
      for k, v in batch.items()
    }

  def step(self, batch: Dict) -> Dict:
    with mesh_context(self.mesh):
      self.state, metrics = self._step(self.state, self._place(batch), self._frozen)
    return jax.device_get(metrics)

  def save(
    self, checkpointer: RunCheckpointer, step: int, cfg: ModelConfig, run_config: Dict
  ) -> None:
    """Starts saving the state as `step` (batches trained on, skipped ones included), with
    `run_config` and the model config."""
    stored = dict(run_config, model=cfg.to_dict(), process_count=jax.process_count())
    checkpointer.save(step, self.state, None, stored)

  def restore(
    self, checkpointer: RunCheckpointer, step: int, cfg: ModelConfig, run_config: Dict
  ) -> None:
    """Replaces the state by the one saved as `step` (onto this trainer's shardings), after
    checking that it was saved for `cfg`'s architecture and with `run_config`'s values."""
    stored = checkpointer.stored_config(step)
    check_resumable(stored, cfg)
    changed = sorted(k for k, v in run_config.items() if stored.get(k) != v)
    if changed:
      details = "; ".join(
        f"{k}: checkpoint {stored.get(k)!r} vs run {run_config[k]!r}" for k in changed
      )
      raise ValueError(f"Cannot resume from {checkpointer.directory} step {step}: {details}")
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
    )
    self.state, _ = checkpointer.restore(step, abstract, None)

  def evaluate(self, batch: Dict) -> Tuple[float, Dict]:
    """(loss, metrics) of the current parameters on `batch`, no update."""
    with mesh_context(self.mesh):
      loss, metrics = self._evaluate(self.state.params, self._place(batch), self._frozen)
    return float(loss), jax.device_get(metrics)


def mean_metrics(trainer: Trainer, rows: Dict[str, np.ndarray], size: int) -> Dict[str, float]:
  """Each metric of the loss averaged over the batches of `size` rows of `rows` (a remainder is
  dropped), with the current parameters."""
  metrics = [trainer.evaluate(batch)[1] for batch in in_batches(rows, size)]
  return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


def fit(
  trainer: Trainer,
  batches: Iterator[Dict],
  steps: int,
  evaluate: Callable[[], Dict[str, float]],
  eval_every: int,
  describe: Callable[[Dict], str],
  cfg: ModelConfig,
  checkpointer: Optional[RunCheckpointer] = None,
  run_config: Optional[Dict] = None,
  metrics_file: Optional[str] = None,
  max_nonfinite_steps: int = TrainConfig.max_nonfinite_steps,
) -> Tuple[Dict, Dict]:
  """Trains up to `steps`, one batch of `batches` per step; returns the records (step and
  metrics) of the start, held-out metrics only, and of the last step.

  `evaluate()` gives held-out metrics, recorded as `eval_<name>` every `eval_every` steps and at the
  end; `describe(record)` is the progress line's middle part. With `checkpointer`, the state is
  saved with `run_config` and the model config `cfg` every `checkpointer.save_every` steps, at the
  end and on SIGTERM (training then stops), and a run finding a checkpoint there resumes from its
  newest step, skipping the batches already trained on; `run_config` holds what must not change
  for that (the data, batch size, seed: `batches` repeats the interrupted run's order). Step
  records are appended to `metrics_file` as JSON lines. A step with a NaN/Inf loss or gradient is
  skipped (no update) and counted as a step; `max_nonfinite_steps` in a row raise
  FloatingPointError.
  """
  run_config = run_config or {}
  step = checkpointer.latest_step() if checkpointer else None
  if step is None:
    step = 0
  else:
    trainer.restore(checkpointer, step, cfg, run_config)
    for _ in range(step):
      next(batches)
    logging.info("Resumed from step %d in %s", step, checkpointer.directory)
  first = record = {"step": step, **{f"eval_{k}": v for k, v in evaluate().items()}}
  stop, started = StopRequest(), time.perf_counter()
  metrics_out = open(metrics_file, "a") if metrics_file else None
  try:
    while step < steps and not stop.requested:
      step += 1
      record = {"step": step, **{k: float(v) for k, v in trainer.step(next(batches)).items()}}
      if record["skipped"]:
        logging.warning("Step %d: non-finite loss or gradient, update skipped", step)
        if int(trainer.state.nonfinite_streak) >= max_nonfinite_steps:
          raise FloatingPointError(
            f"{max_nonfinite_steps} consecutive steps had a NaN/Inf loss or gradient (last loss "
            f"{record['loss']}); stopping at step {step}"
          )
      if step % eval_every == 0 or step == steps or stop.requested:
        record.update({f"eval_{k}": v for k, v in evaluate().items()})
        logging.info(
          "step %d/%d | %s | %.1fs", step, steps, describe(record), time.perf_counter() - started
        )
      if metrics_out:
        metrics_out.write(json.dumps(record) + "\n")
        metrics_out.flush()
      if checkpointer and (checkpointer.should_save(step) or step == steps or stop.requested):
        trainer.save(checkpointer, step, cfg, run_config)
  finally:
    stop.restore()
    if metrics_out:
      metrics_out.close()
    if checkpointer:
      checkpointer.wait()
  return first, record


def split_rows(rows: Sequence, held_out_fraction: float, seed: int) -> Tuple[List, List]:
  """(training rows, held-out rows; at least one) by a seeded permutation."""
  order = np.random.RandomState(seed).permutation(len(rows))
  held = max(1, int(len(rows) * held_out_fraction))
  return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]]


def epoch_batches(arrays: Dict[str, np.ndarray], size: int, seed: int) -> Iterator[Dict]:
  """Endless batches of `size` rows of [N, ...] arrays, reshuffled every epoch (a remainder is
  dropped)."""
  rng = np.random.RandomState(seed)
  while True:
    order = rng.permutation(len(next(iter(arrays.values()))))
    for start in range(0, len(order) - size + 1, size):
      yield {k: v[order[start : start + size]] for k, v in arrays.items()}


def in_batches(arrays: Dict[str, np.ndarray], size: int) -> Iterator[Dict]:
  """The rows of [N, ...] arrays in order, `size` at a time (a remainder is dropped)."""
  count = len(next(iter(arrays.values())))
  for start in range(0, count - size + 1, size):
    yield {k: v[start : start + size] for k, v in arrays.items()}


def with_values(boxed: Dict, values: Dict) -> Dict:
  """`boxed` (logical axes, e.g. from `param_shapes` or a Flax init) holding `values` instead."""
  return jax.tree.map(
    lambda box, value: box.replace_boxed(value),
    boxed,
    values,
    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
  )
