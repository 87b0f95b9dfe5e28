"""Llama 3 tiktoken tokenizer: 128,000 BPE ranks plus 256 special tokens."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from collections.abc import Collection, Iterator, Sequence
from typing import AbstractSet, Literal

import numpy as np
import tiktoken
from absl import logging

# Pre-tokenization regex of Llama 3 (PAPER.md, "Architecture").
SPLIT_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|reserved_special_token_0|>",
  "<|reserved_special_token_1|>",
  "<|finetune_right_pad_id|>",
  "<|step_id|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eom_id|>",
  "<|eot_id|>",
  "<|python_tag|>",
  "<|image|>",
)
# Meta encodes at most this many characters per tiktoken call ...
MAX_ENCODE_CHARS = 400_000
# ... and cuts runs of whitespace / non-whitespace longer than this (tiktoken issue 195).
MAX_RUN_CHARS = 25_000
# Only runs longer than the cap need cutting; shorter ones are left to tiktoken whole.
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")

SpecialSet = Literal["all"] | AbstractSet[str]


def special_token_names() -> list[str]:
  """The 256 special token strings, in id order."""
  num_reserved = NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS)
  reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(num_reserved)]
  return list(_NAMED_SPECIAL_TOKENS) + reserved


def load_ranks(path: str) -> dict[bytes, int]:
  """Reads a tiktoken BPE file: one `base64(token) rank` pair per line."""
  ranks = {}
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(
          f"{path}:{line_number}: expected 'base64_token rank', got {line.strip()!r}"
        ) from e
  return ranks


def _split_long_runs(text: str) -> Iterator[str]:
  """Cuts `text` so no piece holds more than MAX_RUN_CHARS consecutive (non-)whitespace."""
  start = 0
  for run in _LONG_RUN.finditer(text):
    for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
      yield text[start:cut]
      start = cut
  yield text[start:]


class Tokenizer:
  """Encodes text to Llama 3 token ids and back; ids match Meta's reference tokenizer."""

  def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "llama3"):
    num_base_tokens = len(mergeable_ranks)
    self.mergeable_ranks = mergeable_ranks  # BPE token bytes -> rank (= id)
    self.special_tokens: dict[str, int] = {
      token: num_base_tokens + i for i, token in enumerate(special_token_names())
    }
    self._encoding = tiktoken.Encoding(
      name=name,
      pat_str=SPLIT_PATTERN,
      mergeable_ranks=mergeable_ranks,
      special_tokens=self.special_tokens,
    )
    self.bos_id = self.special_tokens["<|begin_of_text|>"]
    self.eos_id = self.special_tokens["<|end_of_text|>"]
    self.eot_id = self.special_tokens["<|eot_id|>"]
    self.eom_id = self.special_tokens["<|eom_id|>"]
    self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
    self.python_tag_id = self.special_tokens["<|python_tag|>"]
    self.start_header_id = self.special_tokens["<|start_header_id|>"]
    self.end_header_id = self.special_tokens["<|end_header_id|>"]
    self.stop_ids = frozenset({self.eos_id, self.eom_id, self.eot_id})

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a `tokenizer.model` file (tiktoken BPE format)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Tokenizer model file not found: {path}")
    tokenizer = cls(load_ranks(path), name=os.path.basename(path))
    logging.info("Loaded tokenizer from %s (vocab size %d).", path, tokenizer.vocab_size)
    return tokenizer

  @classmethod
  def default(cls) -> Tokenizer:
    """Loads the Llama 3 `tokenizer.model` shipped in the `llama-models` package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
        "Tokenizer.default() needs the Llama 3 tokenizer.model from the llama-models "
        "package: run `pip install llama-models`, or use Tokenizer.from_file(path)."
      )
    package_dir = list(spec.submodule_search_locations)[0]
    return cls.from_file(os.path.join(package_dir, "llama3", "tokenizer.model"))

  @property
  def vocab_size(self) -> int:
    """Number of token ids: base BPE ranks plus special tokens (128,256 for Llama 3)."""
    return self._encoding.n_vocab

  def encode(
    self,
    text: str,
    *,
    bos: bool,
    eos: bool,
    allowed_special: SpecialSet | None = None,
    disallowed_special: Literal["all"] | Collection[str] = (),
  ) -> list[int]:
    """Token ids of `text`, optionally wrapped in begin/end_of_text.

    By default special-token strings inside `text` are encoded as plain text;
    `allowed_special="all"` (or a set of names) encodes them as special ids, and
    names in `disallowed_special` raise a ValueError instead.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    allowed_special = set() if allowed_special is None else allowed_special
    ids = [self.bos_id] if bos else []
    for chunk_start in range(0, len(text), MAX_ENCODE_CHARS):
      chunk = text[chunk_start : chunk_start + MAX_ENCODE_CHARS]
      for piece in _split_long_runs(chunk):
        ids.extend(
          self._encoding.encode(
            piece, allowed_special=allowed_special, disallowed_special=disallowed_special
          )
        )
    if eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of a 1-D sequence of ids (list, numpy or jax array); invalid UTF-8 is replaced."""
    ids_array = np.asarray(ids)
    if ids_array.size == 0:
      return ""
    if ids_array.ndim != 1 or not np.issubdtype(ids_array.dtype, np.integer):
      raise ValueError(
        f"decode expects a 1-D sequence of integer ids, got shape {ids_array.shape} "
        f"and dtype {ids_array.dtype}"
      )
    out_of_vocab = ids_array[(ids_array < 0) | (ids_array >= self.vocab_size)]
    if out_of_vocab.size:
      raise ValueError(
        f"Token ids {sorted(set(out_of_vocab.tolist()))} are outside [0, {self.vocab_size}) "
        f"(vocab size {self.vocab_size})"
      )
    return self._encoding.decode(ids_array.tolist())
