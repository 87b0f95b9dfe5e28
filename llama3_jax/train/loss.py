"""Next-token cross-entropy over packed rows, in float32, without a [B, T, vocab] one-hot."""

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
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logits = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  valid = valid_BT.astype(jnp.float32)
  return jnp.sum((log_normalizer - target_logits) * valid), jnp.sum(log_normalizer**2 * valid)
