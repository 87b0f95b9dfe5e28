"""Training: optimizer and schedule, loss, train state and step."""

from llama3_jax.train.loss import cross_entropy_sums, shift_batch
from llama3_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama3_jax.train.checkpointing import RunCheckpointer
from llama3_jax.train.train_state import (
  TrainState,
  abstract_train_state,
  create_train_state,
  state_shardings,
)
from llama3_jax.train.train_step import loss_sums_and_grads, make_train_step
