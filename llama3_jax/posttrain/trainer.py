"""Training any parameter pytree with a loss on a mesh: the state (parameters and AdamW moments)
created in its shards and a jitted step with the NaN/Inf guard of the pretraining step, run by
the loop core (train/fit.py). Used by the reward model and DPO, whose batches and losses differ
from next-token prediction; and the row helpers their binaries share."""

import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama3_jax.config import ModelConfig
from llama3_jax.convert.orbax_io import MODEL_KIND_KEY
from llama3_jax.parallel import logical_shardings
from llama3_jax.parallel.layout import Layout
from llama3_jax.train.checkpointing import RunCheckpointer
from llama3_jax.train.fit import FitPolicy, Task, fit
from llama3_jax.train.flops import train_flops_per_token
from llama3_jax.train.metrics import MetricsOutputs
from llama3_jax.train.train_state import TrainState
from llama3_jax.train.train_step import guarded_update

# loss(params, batch, **frozen) -> (scalar loss, metrics dict of scalars)
LossFn = Callable[[Dict, Dict], Tuple[jnp.ndarray, Dict]]


class Trainer:
  """Training on `layout`'s mesh. `boxed` are the parameters with their logical axes
  (`nn.LogicallyPartitioned` leaves, e.g. a Flax `init`'s output) and their values (host or
  device arrays, placed leaf by leaf into their shards); `fit` trains on dicts of [B, ...] arrays split over the mesh's batch axes. `frozen`
  are keyword arguments of `loss_fn` that are read but not trained (e.g. DPO's reference model,
  already placed on the mesh), passed to every step as arguments rather than compiled into it."""

  def __init__(
    self,
    boxed: Dict,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    layout: Layout,
    frozen: Optional[Dict] = None,
  ):
    self.layout, self._frozen, self.stop_signal = layout, frozen or {}, None
    self.records = ()
    abstract = jax.eval_shape(lambda: TrainState.create(boxed, tx))
    self.shardings = logical_shardings(abstract, layout.mesh)
    params = jax.tree.map(jax.device_put, nn.unbox(boxed), self.shardings.params)
    create = jax.jit(
      layout.traced(lambda p: TrainState.create(p, tx)), out_shardings=self.shardings
    )
    self.state = create(params)

    def train_step(state: TrainState, batch: Dict, frozen: Dict):
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, **frozen
      )
      new_state, grad_norm, finite = guarded_update(state, grads, loss, tx)
      return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=~finite)

    self._step = layout.jit_step(train_step, self.shardings, None)
    self._evaluate = jax.jit(layout.traced(lambda p, batch, frozen: loss_fn(p, batch, **frozen)))

  def _train_step(self, state: TrainState, batch: Dict) -> Tuple[TrainState, Dict]:
    """One update of `state` on a placed batch (the state is donated); the new state is kept as
    the current one, also when the loop stops with an error."""
    self.state, metrics = self._step(state, batch, self._frozen)
    return self.state, metrics

  def size(self, batch: Dict, cfg: ModelConfig) -> Tuple[Tuple[int, ...], float]:
    """([rows, tokens per row], training FLOPs) of a host batch of `cfg`'s model."""
    shape = batch["tokens"].shape
    return shape, train_flops_per_token(cfg, shape[1]) * math.prod(shape)

  def evaluate(self, batch: Dict, params: Optional[Dict] = None) -> Tuple[float, Dict]:
    """(loss, metrics) on `batch` of `params` (default: the current ones), no update."""
    params = self.state.params if params is None else params
    loss, metrics = self._evaluate(params, self.layout.place(batch), self._frozen)
    return float(loss), jax.device_get(metrics)

  def fit(
    self,
    batches: Iterator[Dict],
    policy: FitPolicy,
    evaluate: Callable[[Dict], Dict[str, float]],
    shown: Sequence[str],
    cfg: ModelConfig,
    kind: str = "lm",
    checkpointer: Optional[RunCheckpointer] = None,
    run_config: Optional[Dict] = None,
    metrics: Optional[MetricsOutputs] = None,
    extras: Callable[[], Dict] = dict,
  ) -> Tuple[Dict, Dict]:
    """Trains with the loop core (train/fit.py) and keeps the final state (and `stop_signal`, the
    signal that stopped it early, or None, and `records`, those of every step); returns the records of the start and of the last
    step. `evaluate(params)` gives held-out metrics, a progress line shows the `shown` entries of a
    record; `cfg` is the model (architecture) and `kind` its kind
    ("lm" or "reward"), saved with every checkpoint with `run_config`: what a resume must not
    change (data, batch size, seed: `batches` repeats the interrupted run's order). `extras()`
    adds entries to every record."""
    run_config = run_config or {}
    task = Task(
      model=cfg,
      step=self._train_step,
      place=self.layout.place,
      evaluate=evaluate,
      shown=shown,
      size=lambda batch: self.size(batch, cfg),
      run_config={**run_config, "model": cfg.to_dict(), MODEL_KIND_KEY: kind},
      resume_keys=tuple(run_config),
      extras=extras,
    )
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
    )
    result = fit(task, batches, policy, lambda: self.state, abstract, checkpointer, metrics)
    self.state, self.stop_signal, self.records = result.state, result.stop_signal, result.records
    return result.first, result.last


def mean_metrics(
  trainer: Trainer, rows: Dict[str, np.ndarray], size: int, params: Optional[Dict] = None
) -> Dict[str, float]:
  """Each metric of the loss averaged over batches of `rows` with `params` (default: the
  trainer's current ones): of
  `size` rows, or of as many as there are when fewer, in whole multiples of the mesh's batch
  shards (a remainder is dropped)."""
  count, shards = len(next(iter(rows.values()))), trainer.layout.batch_degree
  size = min(size, count - count % shards)
  if size < 1:
    raise ValueError(
      f"{count} held-out rows do not fill one batch over the {shards} batch shards of mesh "
      f"{trainer.layout.degrees}; hold out more rows"
    )
  metrics = [trainer.evaluate(batch, params)[1] for batch in in_batches(rows, size)]
  return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


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
