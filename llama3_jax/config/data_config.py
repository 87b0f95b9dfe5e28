"""The data description: document sources, their mixture weights, and how rows are packed and read."""

import dataclasses
import math
from typing import Optional

from llama3_jax.config.base import ConfigBase

SOURCE_KINDS = ("text", "jsonl", "array_record")
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Documents in the files matching `path_pattern` (a glob; `**` recurses).

  kind "text": one document per file. "jsonl": one document per line, the string at `field`.
  "array_record": one document per record, a JSON object holding `field`, or plain UTF-8 text
  when `field` is "". `weight` is the source's share of training tokens relative to the others.
  """

  path_pattern: str
  kind: str
  weight: float = 1.0
  field: str = "text"

  def __post_init__(self):
    if not isinstance(self.path_pattern, str) or not self.path_pattern:
      raise ValueError(
        f"DataSource.path_pattern must be a non-empty string, got {self.path_pattern!r}"
      )
    if self.kind not in SOURCE_KINDS:
      raise ValueError(f"DataSource.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
    if (
      isinstance(self.weight, bool)
      or not isinstance(self.weight, (int, float))
      or not (math.isfinite(self.weight) and self.weight > 0)
    ):
      raise ValueError(f"DataSource.weight must be a finite number > 0, got {self.weight!r}")
    if not isinstance(self.field, str):
      raise ValueError(f"DataSource.field must be a string, got {self.field!r}")
    if self.kind == "jsonl" and not self.field:
      raise ValueError(
        f"DataSource.field must name the JSON text field of jsonl {self.path_pattern!r}"
      )


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
  """Pretraining data: which documents, how they are mixed, and the packed rows they become.

  `sources` empty means the embedded corpus (the standard library's Python sources). Rows hold
  `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]); each step takes `global_batch_size`
  rows over all processes. `held_out_fraction` of each source's documents (a fixed, seed-independent
  choice) form the "eval" split and never appear in "train". `num_epochs` None repeats the training
  documents forever, reshuffled each epoch; with `shuffle`, training rows are also shuffled within
  windows of `row_shuffle_window` packed rows (so one long document does not fill a batch; 0 or 1: off).
  `read_threads` threads per source read and tokenize up to `read_buffer_size` documents ahead
  (0 threads: in the iterating thread).
  """

  sources: tuple[DataSource, ...] = ()
  seq_len: int = 256
  global_batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  row_shuffle_window: int = 256
  num_epochs: Optional[int] = None
  held_out_fraction: float = 0.0
  skip_malformed: bool = True
  read_threads: int = 1
  read_buffer_size: int = 32

  def __post_init__(self):
    if isinstance(self.sources, list):
      object.__setattr__(self, "sources", tuple(self.sources))
    if not isinstance(self.sources, tuple) or not all(
      isinstance(s, DataSource) for s in self.sources
    ):
      raise ValueError(f"DataConfig.sources must be a tuple of DataSource, got {self.sources!r}")
    for field in ("seq_len", "global_batch_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DataConfig.{field} must be a positive int, got {value!r}")
    if (
      isinstance(self.seed, bool)
      or not isinstance(self.seed, int)
      or not 0 <= self.seed <= MAX_SEED
    ):
      raise ValueError(f"DataConfig.seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
    if self.num_epochs is not None and (
      isinstance(self.num_epochs, bool)
      or not isinstance(self.num_epochs, int)
      or self.num_epochs <= 0
    ):
      raise ValueError(
        f"DataConfig.num_epochs must be None (forever) or an int > 0, got {self.num_epochs!r}"
      )
    if not isinstance(self.held_out_fraction, (int, float)) or not 0 <= self.held_out_fraction < 1:
      raise ValueError(
        f"DataConfig.held_out_fraction must be in [0, 1), got {self.held_out_fraction!r}"
      )
    for field in ("row_shuffle_window", "read_threads", "read_buffer_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"DataConfig.{field} must be an int >= 0, got {value!r}")

  @property
  def row_len(self) -> int:
    """Tokens per packed row: seq_len inputs plus the last target."""
    return self.seq_len + 1

  @classmethod
  def _from_fields(cls, fields: dict) -> dict:
    if "sources" in fields:
      fields["sources"] = tuple(
        s if isinstance(s, DataSource) else DataSource(**s) for s in fields["sources"]
      )
    return fields
