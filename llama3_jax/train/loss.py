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


def chunked_log_probs(head_fn, x_BTD, targets_BT, chunk: int, shards: int = 1, valid_BT=None):
  """(log p(target) [B, T], logsumexp of the logits [B, T]), float32, with `head_fn` ([B, c, D]
  -> logits [B, c, V]) applied to `chunk` tokens of each row at a time and its logits recomputed
  in the backward pass: [B, T, V] logits never exist at once, only [B, chunk, V]. `chunk` 0: all
  tokens at once. `shards`: the row is split over this many devices (context parallelism); each
  chunk then takes `chunk` tokens from every shard's own part, so no shard waits for another.

  With `valid_BT` (bool [B, T]) only the valid tokens go through the head: each row's (each
  shard part's) valid tokens are taken first, and the chunks after the most any row has are
  skipped, so sparse targets (SFT prompts, pass-key documents) cost only their own tokens' head.
  Both outputs are 0 where a token is not valid. The skip is a `cond` per chunk, which costs
  about one more [V, D] head gradient and two [B, chunk, V] buffers: worth it for sparse targets,
  not for plain text."""
  batch, length, dim = x_BTD.shape
  local = length // shards
  if chunk <= 0 or chunk >= local:
    log_p, lse = _log_probs(head_fn(x_BTD), targets_BT)
    return (log_p, lse) if valid_BT is None else (log_p * valid_BT, lse * valid_BT)
  n_chunks = -(-local // chunk)
  pad = n_chunks * chunk - local

  def parts(x):  # [B, T, ...] -> [B, shards, local, ...]
    return x.reshape((batch, shards, local) + x.shape[2:])

  def chunks(x):  # [B, shards, local, ...] -> [n_chunks, B, shards * chunk, ...], padded
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    x = x.reshape((batch, shards, n_chunks, chunk) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0).reshape((n_chunks, batch, shards * chunk) + x.shape[4:])

  def unchunk(y):  # [n_chunks, B, shards * chunk] -> [B, shards, local]
    y = jnp.moveaxis(y.reshape(n_chunks, batch, shards, chunk), 0, 2)
    return y.reshape(batch, shards, n_chunks * chunk)[:, :, :local]

  def one_chunk(x_BcD, targets_Bc):
    x_BcD = nn.with_logical_constraint(x_BcD, ("batch", "length", "act_embed"))
    return _log_probs(head_fn(x_BcD), targets_Bc)

  @jax.checkpoint  # the cond inside: a checkpointed branch of a cond would keep its logits
  def chunk_if(needed, x_BcD, targets_Bc):
    skip = lambda x_BcD, targets_Bc: (jnp.zeros(targets_Bc.shape, jnp.float32),) * 2
    return jax.lax.cond(needed, one_chunk, skip, x_BcD, targets_Bc)

  x, targets = parts(x_BTD), parts(targets_BT)
  if valid_BT is None:
    _, (log_p, lse) = jax.lax.scan(
      lambda carry, xs: (carry, jax.checkpoint(one_chunk)(*xs)), None, (chunks(x), chunks(targets))
    )
    return unchunk(log_p).reshape(batch, length), unchunk(lse).reshape(batch, length)

  valid = parts(valid_BT)
  order = jnp.argsort(~valid, axis=-1, stable=True)  # each part's valid tokens first
  x = jnp.take_along_axis(x, order[..., None], axis=2)
  targets = jnp.take_along_axis(targets, order, axis=2)
  needed = jnp.max(jnp.sum(valid, axis=-1))  # tokens of the fullest part

  _, (log_p, lse) = jax.lax.scan(
    lambda carry, xs: (carry, chunk_if(*xs)),
    None,
    (jnp.arange(n_chunks) * chunk < needed, chunks(x), chunks(targets)),
  )
  back = jnp.argsort(order, axis=-1)
  unsort = lambda y: (jnp.take_along_axis(unchunk(y), back, axis=2) * valid).reshape(batch, length)
  return unsort(log_p), unsort(lse)


def _log_probs(logits_BTV, targets_BT):
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return target_BT - lse_BT, lse_BT
