"""Context parallelism as in the Llama 3 paper: the sequence axis is split over the `context` mesh axis.

The rows are cut into 2 x CP equal chunks and CP rank r holds chunks r and 2 x CP - 1 - r, so every
rank has the same amount of causal attention work (an early chunk with few keys, a late one with
many). The order is applied once to the step's inputs, targets and masks together; positions and
segment ids travel with their tokens, so RoPE and the causal + document mask use global positions
and the model's numbers do not change. Keys and values are gathered over `context` in attention
(logical axis `kv_length`, see rules.py), queries stay local.
"""

import jax
import jax.numpy as jnp

from llama3_jax.model.masks import load_balanced_order


def reorder_for_context(tree, degree: int):
  """Applies `load_balanced_order` along axis 1 of every [B, T, ...] leaf; identity for degree 1."""
  if degree == 1:
    return tree
  return jax.tree.map(lambda x: jnp.take(x, load_balanced_order(x.shape[1], degree), axis=1), tree)
