"""The synthetic `passkey` source: needle-in-a-haystack documents with their answers, so that a small
model can be taught retrieval (and the NIAH evaluation shown to measure it).

Document i is a prompt of haystack.py on the pass-key filler followed by its answer: 1 needle
(even i) or 4 needles with 2 asked (odd i; when max_tokens allows MULTI_NEEDLE_TOKENS), at a depth
uniform in [0, 100] percent, filling a length uniform in [min_tokens, max_tokens] tokens (at least
MULTI_NEEDLE_TOKENS with 4 needles; BOS and EOS included); after a multi-needle answer the
other two needles are asked and answered too, so every key of a document is retrieved once.
Documents depend only on their index, not on the data seed (which orders them), so the held-out
split is fixed like any source's.
"""

from typing import Optional

import numpy as np

from llama3_jax.data.sources import DocumentSource
from llama3_jax.data.haystack import (
  Haystack,
  answer,
  answer_room,
  asked_count,
  build_prompt,
  question,
)

PASSKEY_KIND = "passkey"
DOCUMENTS = 100_000  # per epoch
MIN_TOKENS = 96
MULTI_NEEDLE_TOKENS = 256  # the least a 4-needle document takes
_STREAM = 0x9A55  # the documents' own random stream


class PasskeyDocuments(DocumentSource):
  """`size` pass-key documents of `min_tokens`..`max_tokens` tokens (min_tokens capped at
  max_tokens), tokenized by `tokenizer`."""

  def __init__(
    self,
    tokenizer,
    max_tokens: int,
    *,
    min_tokens: int = MIN_TOKENS,
    size: int = DOCUMENTS,
    name: Optional[str] = None,
    **kwargs,
  ):
    super().__init__(name or PASSKEY_KIND, **kwargs)
    self._haystack = Haystack.named(tokenizer, "passkey")
    self._lengths = (min(min_tokens, max_tokens), max_tokens)
    self._size = size

  def __len__(self) -> int:
    return self._size

  def where(self, index: int) -> str:
    return f"{self.name} document {int(index)}"

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if not 0 <= index < self._size:
      raise IndexError(f"Document index {index} out of range for {self._size} pass-key documents")
    needles = 4 if index % 2 and self._lengths[1] >= MULTI_NEEDLE_TOKENS else 1
    low = max(self._lengths[0], MULTI_NEEDLE_TOKENS) if needles > 1 else self._lengths[0]
    length = int(np.random.default_rng([_STREAM, index, 0]).integers(low, self._lengths[1] + 1))
    budget = length
    while True:  # the same needles, the haystack shortened until the whole document fits
      text = self._text_within(index, budget, needles)
      over = len(self._haystack.tokenizer.encode(text, bos=True, eos=True)) - length
      if over <= 0:
        return text
      budget -= over

  def _text_within(self, index: int, budget: int, needles: int) -> str:
    """Document `index` built for a prompt of `budget` tokens less the later questions' room."""
    rng = np.random.default_rng([_STREAM, index])
    later_room = 2 * answer_room(asked_count(needles)) if needles > 1 else 0
    prompt = build_prompt(self._haystack, budget - later_room, rng.uniform(0, 100), needles, rng)
    others = [n for n in prompt.needles if n not in prompt.asked]
    later = question(others) + answer(others) if others else ""
    return prompt.text + prompt.answer + later
