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
import numpy as np

from llama3_jax.parallel.mesh import axis_degree


def context_degree() -> int:
  """The `context` degree of the mesh being traced under (1 outside a mesh)."""
  return axis_degree("context")


def load_balanced_order(length: int, degree: int) -> np.ndarray:
  """int [length]: the permutation of 0..length-1 putting chunks r and 2*degree-1-r of 2*degree
  equal chunks into the r-th contiguous block of length / degree (what rank r of `context` holds)."""
  if length % (2 * degree):
    raise ValueError(
      f"Context parallelism of degree {degree} needs a sequence length divisible by "
      f"2 x {degree} = {2 * degree}; got {length}"
    )
  chunks = np.arange(length).reshape(2 * degree, length // (2 * degree))
  return np.concatenate([np.concatenate([chunks[r], chunks[-1 - r]]) for r in range(degree)])


def reorder_for_context(tree, degree: int):
  """Applies `load_balanced_order` along axis 1 of every [B, T, ...] leaf; identity for degree 1."""
  if degree == 1:
    return tree
  return jax.tree.map(lambda x: jnp.take(x, load_balanced_order(x.shape[1], degree), axis=1), tree)
