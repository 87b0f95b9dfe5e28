"""The data description: document sources, their mixture weights, and how rows are packed and read."""

import dataclasses
import math
from typing import Optional

from llama3_jax.config.base import ConfigBase

SOURCE_KINDS = ("text", "jsonl", "array_record", "chat", "passkey")
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Documents in the files matching `path_pattern` (a glob; `**` recurses).

  kind "text": one document per file. "jsonl": one document per line, the string at `field`.
  "array_record": one document per record, a JSON object holding `field`, or plain UTF-8 text
  when `field` is "". "chat": one dialog per line, {"messages": [...]} (data/chat.py), encoded
  with the chat format, the loss on the assistant's tokens only (SFT); `field` is unused.
  "passkey": synthetic retrieval documents (data/passkey.py) at most as long as the shortest row
  of the run, the loss on the keys they copy only; `path_pattern` only names them. Other sources
  mixed with "chat" or "passkey" ones learn every token.
  The patterns `embedded:stdlib` and `embedded:packages` (kind "text") name the embedded corpora
  (data/corpus.py). `weight` is the source's share of training tokens relative to the others.
  `whole_documents`: a document that fits in a row is never cut at a row's end (it starts the next
  row instead, the rest of the row padded); longer ones start a row and are cut at row ends.
  Pass-key documents are kept whole.
  """

  path_pattern: str
  kind: str
  weight: float = 1.0
  field: str = "text"
  whole_documents: bool = False

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
    if not isinstance(self.whole_documents, bool):
      raise ValueError(f"DataSource.whole_documents must be a bool, got {self.whole_documents!r}")
    if self.kind == "jsonl" and not self.field:
      raise ValueError(
        f"DataSource.field must name the JSON text field of jsonl {self.path_pattern!r}"
      )


def _check_positive_int(owner: str, field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{owner}.{field} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BatchStage:
  """Once `start_tokens` training tokens have been read, steps take `global_batch_size` rows of
  `seq_len` tokens (a stage of the batch-size / sequence-length ramp)."""

  start_tokens: int
  global_batch_size: int
  seq_len: int

  def __post_init__(self):
    for field in ("global_batch_size", "seq_len"):
      _check_positive_int("BatchStage", field, getattr(self, field))
    if isinstance(self.start_tokens, bool) or not isinstance(self.start_tokens, int):
      raise ValueError(f"BatchStage.start_tokens must be an int, got {self.start_tokens!r}")

  @property
  def tokens_per_batch(self) -> int:
    return self.global_batch_size * self.seq_len


def parse_ramp(spec: str) -> tuple[BatchStage, ...]:
  """ "252e6:1024x8192,2.87e12:2048x8192" -> stages (start tokens : rows x row length); "" -> ()."""
  stages = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    try:
      start, shape = part.split(":")
      rows, length = shape.lower().split("x")
      start_tokens = float(start)
      if not start_tokens.is_integer():
        raise ValueError(f"{start} is not a whole number of tokens")
      stages.append(BatchStage(int(start_tokens), int(rows), int(length)))
    except ValueError as e:
      raise ValueError(
        f"Bad ramp stage {part!r}: expected START_TOKENS:ROWSxSEQ_LEN, e.g. 252e6:1024x8192 ({e})"
      ) from None
  return tuple(stages)


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
  """Pretraining data: which documents, how they are mixed, and the packed rows they become.

  `sources` empty means the embedded corpus `embedded:stdlib` (the standard library's Python
  sources, one document per file). Rows hold
  `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]); each step takes `global_batch_size`
  rows over all processes. `held_out_fraction` of each source's documents (a fixed, seed-independent
  choice) form the "eval" split and never appear in "train". `num_epochs` None repeats the training
  documents forever, reshuffled each epoch; with `shuffle`, training rows are also shuffled within
  windows of `row_shuffle_window` packed rows (so one long document does not fill a batch; 0 or 1: off).
  `read_threads` threads per source read and tokenize up to `read_buffer_size` documents ahead
  (0 threads: in the iterating thread). `ramp` changes the batch shape as training tokens are
  read (e.g. the paper's 4M tokens of 4K rows, then 8M of 8K after 252M tokens, then 16M after
  2.87T): `global_batch_size` and `seq_len` hold until the first stage starts.
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
  ramp: tuple[BatchStage, ...] = ()

  def __post_init__(self):
    if isinstance(self.sources, list):
      object.__setattr__(self, "sources", tuple(self.sources))
    if not isinstance(self.sources, tuple) or not all(
      isinstance(s, DataSource) for s in self.sources
    ):
      raise ValueError(f"DataConfig.sources must be a tuple of DataSource, got {self.sources!r}")
    for field in ("seq_len", "global_batch_size"):
      _check_positive_int("DataConfig", field, getattr(self, field))
    if isinstance(self.ramp, list):
      object.__setattr__(self, "ramp", tuple(self.ramp))
    if not isinstance(self.ramp, tuple) or not all(isinstance(s, BatchStage) for s in self.ramp):
      raise ValueError(f"DataConfig.ramp must be a tuple of BatchStage, got {self.ramp!r}")
    starts = [s.start_tokens for s in self.ramp]
    if starts != sorted(set(starts)) or (starts and starts[0] <= 0):
      raise ValueError(
        f"DataConfig.ramp stages must start at increasing token counts > 0, got {starts}"
      )
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

  @property
  def stages(self) -> tuple[BatchStage, ...]:
    """Every batch shape of the run, the first starting at token 0."""
    return (BatchStage(0, self.global_batch_size, self.seq_len),) + self.ramp

  def stage_config(self, index: int) -> "DataConfig":
    """This config with stage `index`'s batch shape and no ramp."""
    stage = self.stages[index]
    return self.replace(global_batch_size=stage.global_batch_size, seq_len=stage.seq_len, ramp=())

  @classmethod
  def _from_fields(cls, fields: dict) -> dict:
    if "ramp" in fields:
      fields["ramp"] = tuple(
        s if isinstance(s, BatchStage) else BatchStage(**s) for s in fields["ramp"]
      )
    if "sources" in fields:
      fields["sources"] = tuple(
        s if isinstance(s, DataSource) else DataSource(**s) for s in fields["sources"]
      )
    return fields
