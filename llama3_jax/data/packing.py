"""Packs tokenized documents into fixed-length rows with per-document segment ids and positions.

Documents are laid end to end. A document that does not fit in the rest of a row continues in the
next row, which starts again at the document's last token so far (its positions continue from
there): with targets = row[1:], every next-token pair inside a document is a target exactly once
and no pair crosses a row or a document. Only the last row of finite data is padded
(tokens `pad_id`, segment id 0, position 0). A document marked whole (its dict holds WHOLE: True,
see DataSource.whole_documents) that does not fit in the rest of a row starts the next row instead,
the rest of the row padded; one longer than a row starts a row and is then cut as any other.
grain's ConcatThenSplitIterDataset restarts positions at 0 in a continued document, hence this
small iterator.
"""

from typing import Any, Mapping, Optional

import grain
import numpy as np

WHOLE = "whole"  # key of a document dict: keep the document in one row when it fits


class PackIterDataset(grain.IterDataset):
  """Rows {tokens, segment_ids, positions}: int32 [length] each, from 1-D token arrays, or from
  dicts of a `tokens` array and per-token arrays of the same length (e.g. SFT `targets`), which
  are packed alongside (0 in padding).

  segment_ids number the documents of a row 1, 2, ... (0 = padding); positions count tokens from
  the start of each document. Empty arrays are skipped. `start_state` (a PackDatasetIterator state,
  which does not depend on the row length) starts the rows there instead of at the beginning.
  """

  def __init__(
    self,
    parent: grain.IterDataset,
    length: int,
    *,
    pad_id: int = 0,
    start_state: Optional[dict[str, Any]] = None,
  ):
    if length < 2:
      raise ValueError(f"Packed rows need length >= 2 (an input and a target), got {length}")
    super().__init__(parent)
    self._length = length
    self._pad_id = pad_id
    self._start_state = start_state

  def __iter__(self) -> "PackDatasetIterator":
    iterator = PackDatasetIterator(self._parent.__iter__(), self._length, self._pad_id)
    if self._start_state is not None:
      iterator.set_state(self._start_state)
    return iterator

  def __str__(self) -> str:
    return f"PackIterDataset(length={self._length})"


class PackDatasetIterator(grain.DatasetIterator):
  """Iterator of PackIterDataset.

  State: {"parent": the parent's state before the document the next row starts with,
  "offset": that document's first token in the next row}.
  """

  def __init__(self, parent: grain.DatasetIterator, length: int, pad_id: int):
    super().__init__(parent)
    self._length = length
    self._pad_id = pad_id
    self._doc = None  # the document the next row starts with, if already read
    self._doc_state = None  # the parent's state before `_doc`
    self._offset = 0
    self._whole = False  # whether `_doc` is to be kept whole

  def _next_doc(self) -> bool:
    """Reads the next non-empty document; False at the end of the data."""
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        return False
      doc = dict(doc) if isinstance(doc, Mapping) else {"tokens": doc}
      self._whole = bool(doc.pop(WHOLE, False))
      if len(doc["tokens"]):
        self._doc, self._doc_state, self._offset = doc, state, 0
        return True

  def __next__(self) -> dict[str, np.ndarray]:
    row = None
    segment_ids = np.zeros(self._length, np.int32)
    positions = np.zeros(self._length, np.int32)
    filled = segment = 0
    while filled < self._length and (self._doc is not None or self._next_doc()):
      if row is None:  # the documents' own fields: tokens, and any per-token mask they carry
        row = {
          k: np.full(self._length, self._pad_id if k == "tokens" else 0, np.int32)
          for k in self._doc
        }
      size = len(self._doc["tokens"])
      if self._whole and filled and size - self._offset > self._length - filled:
        break  # a whole document starts the next row
      take = min(self._length - filled, size - self._offset)
      end = self._offset + take
      segment += 1
      for name, values in self._doc.items():
        row[name][filled : filled + take] = values[self._offset : end]
      segment_ids[filled : filled + take] = segment
      positions[filled : filled + take] = np.arange(self._offset, end)
      filled += take
      if end == size:
        self._doc = None
      else:  # the row is full: the next row repeats this row's last token as its first input
        self._offset = end - 1
    if not segment:
      raise StopIteration
    return {**row, "segment_ids": segment_ids, "positions": positions}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._doc_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc = None
    self._doc_state = state["parent"]
    if state["offset"]:
      if not self._next_doc():
        raise ValueError(f"Packing state {state} points past the end of the data")
      self._offset = state["offset"]

  def __str__(self) -> str:
    return f"PackDatasetIterator(length={self._length})"
