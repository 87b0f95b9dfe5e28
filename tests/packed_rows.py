"""Random packed training rows for layout-equality tests."""

import numpy as np


def packed_batches(n: int, rows: int, row_len: int, vocab_size: int, seed: int = 0):
  """`n` batches of [rows, row_len] random tokens, 2-3 documents per row and a padded tail."""
  rng = np.random.RandomState(seed)
  batches = []
  for _ in range(n):
    segment_ids = np.zeros((rows, row_len), np.int32)
    positions = np.zeros((rows, row_len), np.int32)
    for row in range(rows):
      cuts = sorted(rng.choice(np.arange(4, row_len - 4), 2, replace=False))
      bounds = [0, *cuts, row_len - rng.randint(0, 3)]
      for segment, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        segment_ids[row, start:end] = segment
        positions[row, start:end] = np.arange(end - start)
    tokens = rng.randint(0, vocab_size, (rows, row_len)).astype(np.int32)
    batches.append(
      dict(tokens=tokens * (segment_ids > 0), positions=positions, segment_ids=segment_ids)
    )
  return batches
