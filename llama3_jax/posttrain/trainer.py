"""Training any parameter pytree with a loss on a mesh: the state (parameters and AdamW moments)
created in its shards, and a jitted step with the NaN/Inf guard of the pretraining step. Used by
the reward model and DPO, whose batches and losses differ from next-token prediction."""

from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama3_jax.parallel import batch_sharding, logical_shardings, mesh_context
from llama3_jax.train.train_state import TrainState
from llama3_jax.train.train_step import guarded_update

# loss(params, batch) -> (scalar loss, metrics dict of scalars)
LossFn = Callable[[Dict, Dict], Tuple[jnp.ndarray, Dict]]


class Trainer:
  """`boxed` are the parameters with their logical axes (`nn.LogicallyPartitioned` leaves, e.g. a
  Flax `init`'s output) and their values; `step(batch)` trains on a dict of [B, ...] arrays split
  over the mesh's batch axes and returns the step's metrics."""

  def __init__(self, boxed: Dict, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh):
    self.mesh = mesh
    abstract = jax.eval_shape(lambda: TrainState.create(boxed, tx))
    self.shardings = logical_shardings(abstract, mesh)
    with mesh_context(mesh):
      self.state = jax.jit(
        lambda: TrainState.create(nn.unbox(boxed), tx), out_shardings=self.shardings
      )()
    self._batch_sharding = batch_sharding(mesh)

    def train_step(state: TrainState, batch: Dict):
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
      new_state, grad_norm, finite = guarded_update(state, grads, loss, tx)
      return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=~finite)

    self._step = jax.jit(train_step, out_shardings=(self.shardings, None), donate_argnums=0)
    self._evaluate = jax.jit(lambda params, batch: loss_fn(params, batch))

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
      self.state, metrics = self._step(self.state, self._place(batch))
    return jax.device_get(metrics)

  def evaluate(self, batch: Dict) -> Tuple[float, Dict]:
    """(loss, metrics) of the current parameters on `batch`, no update."""
    with mesh_context(self.mesh):
      loss, metrics = self._evaluate(self.state.params, self._place(batch))
    return float(loss), jax.device_get(metrics)


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
