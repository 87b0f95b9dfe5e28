"""make_pipeline: documents -> held-out split, per-process shard, seeded shuffle per epoch, tokenize ->
mixture of sources by token weight -> packed rows -> window shuffle of rows -> per-process batches
(of a shape that may change with tokens read: the batch-size / sequence-length ramp).
Deterministic given the seed, and checkpointable through grain's `get_state()` / `set_state()`."""

import functools
import json
from collections.abc import Sequence
from typing import Any, Optional

import grain
import numpy as np
from absl import logging

from llama3_jax.config.data_config import DataConfig
from llama3_jax.data.chat import parse_sft_row, sft_example
from llama3_jax.data.corpus import EMBEDDED, embedded_corpus
from llama3_jax.data.packing import WHOLE, PackIterDataset
from llama3_jax.data.passkey import PASSKEY_KIND, PasskeyDocuments, digit_token_ids, key_copies
from llama3_jax.data.ramp import RampDatasetIterator, tokens_after
from llama3_jax.data.sources import DocumentSource, MalformedCounter, open_source
from llama3_jax.tokenizer.chat_format import ChatFormat

SPLITS = ("train", "eval")
# Source kinds whose documents mark the tokens learned (`targets`); the others then learn every token.
TARGET_KINDS = ("chat", PASSKEY_KIND)


def held_out_mask(num_docs: int, fraction: float) -> np.ndarray:
  """bool [num_docs]: documents reserved for evaluation, chosen by a fixed hash of their index.

  Seed-independent, so every run of a config evaluates on the same documents.
  """
  x = np.arange(num_docs, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # splitmix64
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


class MixIterDataset(grain.IterDataset):
  """Interleaves documents (1-D token arrays) of several parents so each gets `weights` share of tokens.

  Deterministic: the next document comes from the parent furthest below its share (fewest
  tokens / weight; ties to the first). Empty arrays (malformed documents) are skipped; a parent that
  yields none but those for twice its `epoch_sizes` documents in a row is an error. An exhausted parent
  drops out; the mix ends when all have. (grain's `IterDataset.mix` weighs documents, not tokens.)
  """

  def __init__(
    self,
    parents: Sequence[grain.IterDataset],
    weights: Sequence[float],
    *,
    names: Sequence[str],
    epoch_sizes: Sequence[int],
  ):
    if not len(parents) == len(weights) == len(names) == len(epoch_sizes) > 0:
      raise ValueError(
        f"MixIterDataset needs as many weights ({len(weights)}), names ({len(names)}) and epoch sizes "
        f"({len(epoch_sizes)}) as parents ({len(parents)}), at least one"
      )
    super().__init__(list(parents))
    self._weights = [float(w) for w in weights]
    self._names = list(names)
    self._epoch_sizes = list(epoch_sizes)

  def __iter__(self) -> "MixDatasetIterator":
    return MixDatasetIterator(
      [p.__iter__() for p in self.parents], self._weights, self._names, self._epoch_sizes
    )

  def __str__(self) -> str:
    return f"MixIterDataset(weights={self._weights})"


class MixDatasetIterator(grain.DatasetIterator):
  """State: {"parents": [states], "tokens": [tokens taken per parent], "exhausted": [bool],
  "malformed_run": [malformed documents in a row per parent]}."""

  def __init__(
    self,
    parents: Sequence[grain.DatasetIterator],
    weights: Sequence[float],
    names: Sequence[str],
    epoch_sizes: Sequence[int],
  ):
    super().__init__(list(parents))
    self._weights = weights
    self._names = names
    self._epoch_sizes = epoch_sizes
    self._tokens = [0] * len(parents)
    self._exhausted = [False] * len(parents)
    self._malformed_run = [0] * len(parents)

  def __next__(self) -> np.ndarray:
    while True:
      live = [i for i, done in enumerate(self._exhausted) if not done]
      if not live:
        raise StopIteration
      i = min(live, key=lambda j: (self._tokens[j] / self._weights[j], j))
      try:
        doc = next(self._parents[i])
      except StopIteration:
        self._exhausted[i] = True
        continue
      if num_tokens(doc):
        self._malformed_run[i] = 0
        self._tokens[i] += num_tokens(doc)
        return doc
      self._malformed_run[i] += 1
      if self._malformed_run[i] >= 2 * self._epoch_sizes[i]:
        raise ValueError(
          f"Every document of source {self._names[i]!r} is malformed ({self._malformed_run[i]} in a row); "
          "check the DataSource kind and field"
        )

  def get_state(self) -> dict[str, Any]:
    return {
      "parents": [p.get_state() for p in self._parents],
      "tokens": list(self._tokens),
      "exhausted": list(self._exhausted),
      "malformed_run": list(self._malformed_run),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["parents"]) != len(self._parents):
      raise ValueError(
        f"Mixture state has {len(state['parents'])} sources, the pipeline {len(self._parents)}"
      )
    for parent, parent_state in zip(self._parents, state["parents"]):
      parent.set_state(parent_state)
    self._tokens = [int(t) for t in state["tokens"]]
    self._exhausted = [bool(e) for e in state["exhausted"]]
    self._malformed_run = [int(r) for r in state["malformed_run"]]

  def __str__(self) -> str:
    return f"MixDatasetIterator(weights={self._weights})"


def _seed(seed: int, *key: int) -> int:
  """An independent uint32 seed for the part of the pipeline named by `key`."""
  return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


def _tokenize(source: DocumentSource, tokenizer: Any, index: int) -> np.ndarray:
  """int32 [n] ids of document `index` with BOS and EOS; empty for a malformed document."""
  text = source[int(index)]
  if text is None:
    return np.zeros(0, np.int32)
  return np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)


def _encode_passkey(
  source: DocumentSource, tokenizer: Any, digit_ids: frozenset, index: int
) -> dict:
  """{tokens int32 [n], targets int32 [n]} of pass-key document `index`: targets are the keys
  it copies (passkey.key_copies)."""
  tokens = _tokenize(source, tokenizer, index)
  return {"tokens": tokens, "targets": key_copies(tokens, digit_ids)}


def _all_targets(doc) -> dict:
  """A document every token of which is learned, in the form of the documents that carry targets."""
  return {"tokens": doc, "targets": np.ones(len(doc), np.int32)}


def _encode_dialog(source: DocumentSource, chat: ChatFormat, index: int) -> dict:
  """{tokens int32 [n], targets int32 [n]} of dialog `index` (targets: the assistant's tokens);
  empty for a malformed row."""
  text = source[int(index)]
  tokens = targets = np.zeros(0, np.int32)
  if text is None:  # malformed, counted by the source
    return {"tokens": tokens, "targets": targets}
  try:
    tokens, targets = sft_example(chat, parse_sft_row(json.loads(text)))
  except Exception as e:  # any failure of one row's parsing or encoding is that row's
    source._malformed(source.where(index), f"not a dialog ({type(e).__name__}: {e})")
  return {"tokens": tokens, "targets": targets.astype(np.int32)}


def _kept_whole(doc) -> dict:
  """The document marked for the packer to keep in one row (packing.py)."""
  return {**(doc if isinstance(doc, dict) else {"tokens": doc}), WHOLE: True}


def _open(source, data_cfg: DataConfig, tokenizer: Any, **kwargs) -> DocumentSource:
  """The documents of a DataSource: an embedded corpus, pass-key documents at most as long as the
  shortest row (so that every stage of a ramp keeps them whole), or files."""
  if source.kind == PASSKEY_KIND:
    max_tokens = min(stage.seq_len for stage in data_cfg.stages) + 1  # rows hold seq_len + 1
    return PasskeyDocuments(tokenizer, max_tokens, name=source.path_pattern, **kwargs)
  if source.path_pattern in EMBEDDED:
    return EMBEDDED[source.path_pattern](**kwargs)
  return open_source(source, **kwargs)


def num_tokens(doc) -> int:
  """Tokens in a document: a token array, or a dict of per-token arrays."""
  return len(doc["tokens"]) if isinstance(doc, dict) else len(doc)


def _documents(
  source: DocumentSource,
  source_index: int,
  data_cfg: DataConfig,
  tokenizer: Any,
  split: str,
  process_index: int,
  process_count: int,
) -> tuple[grain.IterDataset, int]:
  """One source's token arrays for this split and process, and their number per epoch."""
  held_out = held_out_mask(len(source), data_cfg.held_out_fraction)
  indices = np.flatnonzero(held_out if split == "eval" else ~held_out)[process_index::process_count]
  ds = grain.MapDataset.source(indices)
  if split == "train":
    if not len(indices):
      raise ValueError(
        f"Source {source.name!r} has no training documents for process {process_index} of "
        f"{process_count} ({len(source)} documents, held_out_fraction={data_cfg.held_out_fraction})"
      )
    if data_cfg.shuffle:
      ds = ds.shuffle(seed=_seed(data_cfg.seed, 0, source_index))
    ds = ds.repeat(data_cfg.num_epochs)
  spec = data_cfg.sources[source_index] if data_cfg.sources else None
  if spec and spec.kind == "chat":
    ds = ds.map(functools.partial(_encode_dialog, source, ChatFormat(tokenizer)))
  elif spec and spec.kind == PASSKEY_KIND:
    ds = ds.map(functools.partial(_encode_passkey, source, tokenizer, digit_token_ids(tokenizer)))
  else:
    ds = ds.map(functools.partial(_tokenize, source, tokenizer))
    if any(s.kind in TARGET_KINDS for s in data_cfg.sources):
      ds = ds.map(_all_targets)
  if spec and (spec.whole_documents or spec.kind == PASSKEY_KIND):
    ds = ds.map(_kept_whole)
  read_options = grain.ReadOptions(
    num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.read_buffer_size
  )
  return ds.to_iter_dataset(read_options), len(indices)


def make_pipeline(
  data_cfg: DataConfig,
  tokenizer: Any,
  *,
  split: str = "train",
  process_index: int = 0,
  process_count: int = 1,
  counter: Optional[MalformedCounter] = None,
) -> grain.DatasetIterator:
  """This process's batches: dicts of int32 [global_batch_size // process_count, seq_len + 1] arrays.

  Keys `tokens`, `segment_ids` (1, 2, ... per document in a row, 0 = padding) and `positions`
  (within the document); see packing.py. `tokenizer.encode(text, bos=True, eos=True)` tokenizes.
  "train" repeats `num_epochs` times (None: forever), reshuffling documents each epoch and rows
  within windows, and follows `data_cfg.ramp` (see ramp.py); "eval" reads the held-out documents
  once, unshuffled, in batches of the first stage's shape, and pads its last batch with padding
  rows. Malformed documents skipped are counted in `counter`. Resume exactly with
  `set_state(get_state())`.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"Need 0 <= process_index < process_count, got {process_index} and {process_count}"
    )
  for stage in data_cfg.stages:
    if stage.global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size={stage.global_batch_size} (the stage from token {stage.start_tokens}) "
        f"is not divisible by process_count={process_count}"
      )
  if split == "eval" and not data_cfg.held_out_fraction:
    raise ValueError("The eval split needs DataConfig.held_out_fraction > 0")
  documents = _mixed_documents(
    data_cfg, tokenizer, split, process_index, process_count, counter or MalformedCounter()
  )

  def stage_batches(index: int, packer_start: Optional[dict]) -> grain.DatasetIterator:
    stage_cfg = data_cfg.stage_config(index)
    rows = PackIterDataset(documents, stage_cfg.row_len, start_state=packer_start)
    if split == "train" and stage_cfg.shuffle and stage_cfg.row_shuffle_window > 1:
      rows = grain.experimental.WindowShuffleIterDataset(
        rows, window_size=stage_cfg.row_shuffle_window, seed=_seed(stage_cfg.seed, 1)
      )
    batch_size = stage_cfg.global_batch_size // process_count
    pad_batch = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
    return iter(rows.batch(batch_size, batch_fn=pad_batch))

  if split == "train" and data_cfg.ramp:
    return RampDatasetIterator(data_cfg.stages, stage_batches)
  return stage_batches(0, None)


def _mixed_documents(
  data_cfg: DataConfig,
  tokenizer: Any,
  split: str,
  process_index: int,
  process_count: int,
  counter: MalformedCounter,
) -> grain.IterDataset:
  """Token arrays of this split and process from every source, mixed by token weight."""
  kwargs = dict(skip_malformed=data_cfg.skip_malformed, counter=counter)
  if data_cfg.sources:
    sources = [_open(s, data_cfg, tokenizer, **kwargs) for s in data_cfg.sources]
    weights = [s.weight for s in data_cfg.sources]
  else:
    sources, weights = [embedded_corpus(**kwargs)], [1.0]
  names = [s.name for s in sources]
  streams, sizes = zip(
    *(
      _documents(s, i, data_cfg, tokenizer, split, process_index, process_count)
      for i, s in enumerate(sources)
    )
  )
  if not sum(sizes):
    raise ValueError(
      f"No {split} documents for process {process_index} of {process_count} "
      f"(held_out_fraction={data_cfg.held_out_fraction}, sources {names})"
    )
  logging.info(
    "Data %s split, process %d of %d: %s documents per epoch from %s.",
    split,
    process_index,
    process_count,
    list(sizes),
    names,
  )
  return MixIterDataset(streams, weights, names=names, epoch_sizes=sizes)


def check_position(state: dict, steps: int, data_cfg: DataConfig, process_count: int = 1) -> None:
  """Raises ValueError naming the entry of this process's data position `state` (make_pipeline's
  `get_state()`) that `steps` training batches cannot have reached: a negative or fractional
  count; a source's next document beyond the documents the rows read so far can hold (each holds
  at least one token; rows read: the batches' rows plus a shuffle window per stage); a position in
  a shuffle window beyond its size; or, with a ramp, more training tokens than the closed form
  (fewer when the data started afresh after a change)."""
  stages = data_cfg.stages
  window = data_cfg.row_shuffle_window if data_cfg.shuffle else 0
  rows = steps * max(s.global_batch_size for s in stages) // process_count
  rows += (window + 1) * len(stages)
  bounds = {
    "next_index": rows * (max(s.seq_len for s in stages) + 1) + len(stages),
    "pos_in_window": window,
    "window_index": rows // max(window, 1) + 1,
  }

  def walk(entry, path):
    if isinstance(entry, dict):
      for key, value in entry.items():
        walk(value, f"{path}.{key}" if path else key)
    elif isinstance(entry, list):
      for i, value in enumerate(entry):
        walk(value, f"{path}[{i}]")
    elif isinstance(entry, (int, float)) and not isinstance(entry, bool):
      if not (float(entry).is_integer() and entry >= 0):
        raise ValueError(f"{path} is {entry!r}, not a count")
      bound = bounds.get(path.rsplit(".", 1)[-1].split("[")[0])
      if bound is not None and entry > bound:
        raise ValueError(f"{path} is {entry}, beyond what {steps} steps can reach ({bound})")

  walk(state, "")
  tokens = state.get("tokens")
  if data_cfg.ramp and not (isinstance(tokens, int) and tokens <= tokens_after(stages, steps)):
    raise ValueError(
      f"tokens is {tokens!r}; {steps} steps of this ramp read at most {tokens_after(stages, steps)}"
    )
