"""Next-token cross-entropy over packed rows, in float32, without a [B, T, vocab] one-hot, and
the output head applied in token chunks so that whole [B, T, vocab] logits never exist."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def shift_batch(batch):
  """Rows of L = T + 1 tokens -> model inputs [B, T] and (targets, valid) [B, T].

  A target is valid only inside the document of its input token: never across a document
  boundary, never on padding (segment id 0), and, when the batch has `targets` [B, L] (SFT rows),
  only where that is non-zero.
  """
  segment_ids = batch["segment_ids"]
  inputs = dict(
    tokens=batch["tokens"][:, :-1],
    positions=batch["positions"][:, :-1],
    segment_ids=segment_ids[:, :-1],
  )
  valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  if "targets" in batch:  # SFT: only the tokens marked as targets (the assistant's) are learned
    valid &= batch["targets"][:, 1:] != 0
  return inputs, batch["tokens"][:, 1:], valid


def cross_entropy_sums(logits_BTV, targets_BT, valid_BT):
  """(sum of -log p(target), sum of logsumexp^2 for z-loss) over valid targets, both float32."""
  return log_prob_sums(*_log_probs(logits_BTV, targets_BT), valid_BT)


def log_prob_sums(log_p_BT, lse_BT, valid_BT):
  """(sum of -log p(target), sum of logsumexp^2) over the valid targets, float32."""
  valid = valid_BT.astype(jnp.float32)
  return -jnp.sum(log_p_BT * valid), jnp.sum(lse_BT**2 * valid)


def chunked_log_probs(head_fn, x_BTD, targets_BT, chunk: int, shards: int = 1):
  """(log p(target) [B, T], logsumexp of the logits [B, T]), float32, with `head_fn` ([B, c, D]
  -> logits [B, c, V]) applied to `chunk` tokens of each row at a time and its logits recomputed
  in the backward pass: [B, T, V] logits never exist at once, only [B, chunk, V]. `chunk` 0: all
  tokens at once. `shards`: the row is split over this many devices (context parallelism); each
  chunk then takes `chunk` tokens from every shard's own part, so no shard waits for another."""
  batch, length, dim = x_BTD.shape
  local = length // shards
  if chunk <= 0 or chunk >= local:
    return _log_probs(head_fn(x_BTD), targets_BT)
  n_chunks = -(-local // chunk)
  pad = n_chunks * chunk - local

  def chunks(x):  # [B, T, ...] -> [n_chunks, B, shards * chunk, ...], each shard's part padded
    x = x.reshape((batch, shards, local) + x.shape[2:])
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    x = x.reshape((batch, shards, n_chunks, chunk) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0).reshape((n_chunks, batch, shards * chunk) + x.shape[4:])

  def unchunk(y):  # [n_chunks, B, shards * chunk] -> [B, T]
    y = jnp.moveaxis(y.reshape(n_chunks, batch, shards, chunk), 0, 2)
    return y.reshape(batch, shards, n_chunks * chunk)[:, :, :local].reshape(batch, length)

  @jax.checkpoint
  def one_chunk(x_BcD, targets_Bc):
    x_BcD = nn.with_logical_constraint(x_BcD, ("batch", "length", "act_embed"))
    return _log_probs(head_fn(x_BcD), targets_Bc)

  _, (log_p, lse) = jax.lax.scan(
    lambda carry, xs: (carry, one_chunk(*xs)), None, (chunks(x_BTD), chunks(targets_BT))
  )
  return unchunk(log_p), unchunk(lse)


def _log_probs(logits_BTV, targets_BT):
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return target_BT - lse_BT, lse_BT
