"""Document sources: random-access sequences of text documents read from text, JSONL or ArrayRecord files.

A source's `__getitem__` returns the document's text, or None for a malformed row (bad JSON, missing
or non-string field, bytes that are not UTF-8, empty text), which is counted in a `MalformedCounter`
and logged (rate-limited); with `skip_malformed=False` it raises a ValueError naming file and line
or record instead. Sources are thread-safe: every read opens its own file handle.
"""

import collections
import glob
import json
import os
import threading
from collections.abc import Sequence
from typing import Optional

import grain
import numpy as np
from absl import logging

from llama3_jax.config.data_config import DataSource

# The first this many malformed rows of a counter are logged, then one in every LOG_EVERY.
LOG_FIRST = 10
LOG_EVERY = 1000
_SCAN_CHUNK_BYTES = 1 << 24


class MalformedCounter:
  """Thread-safe count of the malformed rows skipped, per source name; a row read again (another
  epoch, a resume, the held-out split) counts once."""

  def __init__(self):
    self._lock = threading.Lock()
    self._rows = collections.defaultdict(set)

  def add(self, source: str, where: str) -> Optional[int]:
    """Counts the malformed row `where` of `source`; returns the total over all sources when the
    row is new, None when it was counted before."""
    with self._lock:
      if where in self._rows[source]:
        return None
      self._rows[source].add(where)
      return sum(map(len, self._rows.values()))

  def counts(self) -> dict[str, int]:
    """Skipped rows per source name."""
    with self._lock:
      return {source: len(rows) for source, rows in self._rows.items()}

  @property
  def total(self) -> int:
    with self._lock:
      return sum(map(len, self._rows.values()))


def expand_pattern(pattern: str) -> list[str]:
  """Sorted files matching a glob pattern (`**` recurses); FileNotFoundError when none match."""
  paths = sorted(
    p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
  )
  if not paths:
    raise FileNotFoundError(f"No files match DataSource.path_pattern {pattern!r}")
  return paths


# A row longer than this is malformed (read no further); documents are shorter.
MAX_ROW_BYTES = 64 * 2**20


class DocumentSource(Sequence):
  """Base of the sources: `len` documents, `source[i]` is text or None (malformed, skipped);
  `where(i)` names row i's place ("file:line", "file[record r]", a file)."""

  def __init__(
    self, name: str, *, skip_malformed: bool = True, counter: Optional[MalformedCounter] = None
  ):
    self.name = name
    self.skip_malformed = skip_malformed
    self.counter = MalformedCounter() if counter is None else counter

  def where(self, index: int) -> str:
    return f"{self.name} row {int(index) + 1}"

  def _malformed(self, where: str, reason: str) -> None:
    """Skips (counts, logs, returns None) or raises for the malformed row at `where`."""
    if not self.skip_malformed:
      raise ValueError(
        f"{where}: {reason} (skip such rows: --on_bad_row=skip, DataConfig.skip_malformed=True)"
      )
    total = self.counter.add(self.name, where)
    if total is not None and (total <= LOG_FIRST or total % LOG_EVERY == 0):
      logging.warning(
        "Skipping malformed document %s: %s (%d skipped so far).", where, reason, total
      )
    return None

  def _text(self, data: bytes, where: str, field: str) -> Optional[str]:
    """Decodes a row: UTF-8 text, or the string `field` of a JSON object when `field` is set."""
    if len(data) > MAX_ROW_BYTES:
      return self._malformed(
        where, f"{len(data):,} bytes, over the {MAX_ROW_BYTES:,} a row may take"
      )
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      return self._malformed(where, f"not valid UTF-8 ({e.reason} at byte {e.start})")
    if field:
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        return self._malformed(where, f"invalid JSON ({e.msg} at column {e.colno})")
      except RecursionError:
        return self._malformed(where, "JSON nested deeper than the parser allows")
      if not isinstance(row, dict) or field not in row:
        return self._malformed(where, f"no field {field!r}")
      text = row[field]
      if not isinstance(text, str):
        return self._malformed(where, f"field {field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
      return self._malformed(where, "empty text")
    return text

  def _locate(self, index: int, ends: np.ndarray) -> tuple[int, int]:
    """(file number, row within that file) of a global row `index`, given cumulative row counts."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(
        f"Document index {index} out of range for {len(self)} documents of {self.name!r}"
      )
    file_number = int(np.searchsorted(ends, index, side="right"))
    return file_number, index - (int(ends[file_number - 1]) if file_number else 0)


class TextFiles(DocumentSource):
  """One document per file."""

  def __init__(self, paths: Sequence[str], *, name: Optional[str] = None, **kwargs):
    if not paths:
      raise ValueError(f"TextFiles needs at least one path (source {name!r})")
    super().__init__(name or paths[0], **kwargs)
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def where(self, index: int) -> str:
    return self.paths[int(index)]

  def __getitem__(self, index: int) -> Optional[str]:
    path = self.paths[index]
    with open(path, "rb") as f:
      return self._text(f.read(MAX_ROW_BYTES + 1), path, field="")


def _line_starts(path: str) -> np.ndarray:
  """Byte offsets [n + 1] of the n lines of a file (the last one is the end of the file)."""
  starts = [np.zeros(1, np.int64)]
  size = 0
  with open(path, "rb") as f:
    while chunk := f.read(_SCAN_CHUNK_BYTES):
      newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
      starts.append(newlines.astype(np.int64) + size + 1)
      size += len(chunk)
  starts = np.concatenate(starts)
  if starts[-1] != size:  # the last line has no newline
    starts = np.append(starts, size)
  return starts


class JsonLines(DocumentSource):
  """One document per line: the string at `field` of the line's JSON object, or the whole line
  when `field` is ""; blank lines are malformed."""

  def __init__(self, paths: Sequence[str], field: str, *, name: Optional[str] = None, **kwargs):
    if not paths:
      raise ValueError(f"JsonLines needs at least one path (source {name!r})")
    super().__init__(name or paths[0], **kwargs)
    self.paths = list(paths)
    self.field = field
    self._starts = [_line_starts(p) for p in self.paths]
    self._ends = np.cumsum([len(s) - 1 for s in self._starts])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def where(self, index: int) -> str:
    file_number, line = self._locate(index, self._ends)
    return f"{self.paths[file_number]}:{line + 1}"

  def __getitem__(self, index: int) -> Optional[str]:
    file_number, line = self._locate(index, self._ends)
    start, stop = self._starts[file_number][line : line + 2]
    with open(self.paths[file_number], "rb") as f:
      f.seek(int(start))
      data = f.read(min(int(stop - start), MAX_ROW_BYTES + 1))
    return self._text(data, self.where(index), self.field)


class ArrayRecords(DocumentSource):
  """One document per ArrayRecord record: JSON with `field`, or plain UTF-8 text when `field` is ""."""

  def __init__(self, paths: Sequence[str], field: str, *, name: Optional[str] = None, **kwargs):
    if not paths:
      raise ValueError(f"ArrayRecords needs at least one path (source {name!r})")
    super().__init__(name or paths[0], **kwargs)
    self.paths = list(paths)
    self.field = field
    self._files = []
    for path in self.paths:
      try:
        self._files.append(grain.sources.ArrayRecordDataSource(path))
      except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: cannot open as an ArrayRecord file: {e}") from e
    self._ends = np.cumsum([len(f) for f in self._files])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def where(self, index: int) -> str:
    file_number, record = self._locate(index, self._ends)
    return f"{self.paths[file_number]}[record {record}]"

  def __getitem__(self, index: int) -> Optional[str]:
    file_number, record = self._locate(index, self._ends)
    return self._text(self._files[file_number][record], self.where(index), self.field)


def open_source(
  source: DataSource, *, skip_malformed: bool = True, counter: Optional[MalformedCounter] = None
) -> DocumentSource:
  """The documents of a `DataSource`, named by its path pattern."""
  paths = expand_pattern(source.path_pattern)
  kwargs = dict(name=source.path_pattern, skip_malformed=skip_malformed, counter=counter)
  if source.kind == "text":
    return TextFiles(paths, **kwargs)
  if source.kind == "jsonl":
    return JsonLines(paths, source.field, **kwargs)
  if source.kind == "chat":
    return JsonLines(paths, "", **kwargs)  # whole lines: the dialog is parsed when encoded
  return ArrayRecords(paths, source.field, **kwargs)
