"""The synthetic `passkey` source: needle-in-a-haystack documents with their answers, so that a small
model can be taught retrieval (and the NIAH evaluation shown to measure it).

Documents come in three kinds (by index i % 8), haystacks and lists at a length uniform in
[min_tokens, max_tokens] tokens (BOS and EOS included), repeats at most max_tokens long:
- haystacks (i % 8 == 0): a prompt of haystack.py on the pass-key filler followed by its answer,
  1 needle (i % 16 == 0) or 4 needles with 2 asked (i % 16 == 8, when max_tokens allows
  MULTI_NEEDLE_TOKENS), at a depth uniform in [0, 100] percent; after a multi-needle answer the
  other two needles are asked and answered too, so every key of a document is retrieved once;
- needle lists (i % 8 == 1): needles on distinct doors one after another (as many as fit, at most
  one per door), then the question for one of them and its answer;
- repeats (the other six of eight): "The pass key is <digits>. Again: <digits>." with a random
  count of random digits (from KEY_DIGITS to as many as fit), so no fixed distance finds a copy.
The lists and repeats are drills: retrieval at short range with many keys to copy per token (a
haystack has a few copied tokens per hundred).

What a model learns from these documents are the keys it can copy (`key_copies`: every later
mention of a key given before, with the tokens around it); the first mention of a key is random and
the filler is not worth learning. Documents depend only on their index, not on the data seed
(which orders them), so the held-out split is fixed like any source's.
"""

from typing import Optional

import numpy as np

from llama3_jax.data.sources import DocumentSource
from llama3_jax.data.haystack import (
  DOORS,
  KEY_DIGITS,
  Haystack,
  answer,
  answer_room,
  asked_count,
  build_prompt,
  draw_needles,
  question,
)

PASSKEY_KIND = "passkey"
DOCUMENTS = 100_000  # per epoch
MIN_TOKENS = 56  # the least a 1-needle document takes
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
    kind = index % 8
    if kind >= 2:
      return self._repeat(np.random.default_rng([_STREAM, index]), self._lengths[1])
    needles = 4 if index % 16 == 8 and self._lengths[1] >= MULTI_NEEDLE_TOKENS else 1
    low = max(self._lengths[0], MULTI_NEEDLE_TOKENS) if needles > 1 else self._lengths[0]
    length = int(np.random.default_rng([_STREAM, index, 0]).integers(low, self._lengths[1] + 1))
    if kind == 1:
      return self._needle_list(np.random.default_rng([_STREAM, index]), length)
    budget = length
    while True:  # the same needles, the haystack shortened until the whole document fits
      text = self._text_within(index, budget, needles)
      over = len(self._haystack.tokenizer.encode(text, bos=True, eos=True)) - length
      if over <= 0:
        return text
      budget -= over

  def _fits(self, text: str, length: int) -> bool:
    return len(self._haystack.tokenizer.encode(text, bos=True, eos=True)) <= length

  def _needle_list(self, rng: np.random.Generator, length: int) -> str:
    """As many needles as fit in `length` tokens (at least one) with a question for one of them."""
    needles = draw_needles(rng, len(DOORS))
    asked = int(rng.integers(len(DOORS)))
    for count in range(len(DOORS), 0, -1):
      chosen = [needles[asked % count]]
      text = "".join(n.sentence for n in needles[:count]).lstrip(" ")
      text += question(chosen) + answer(chosen)
      if count == 1 or self._fits(text, length):
        return text

  def _repeat(self, rng: np.random.Generator, length: int) -> str:
    """Random digits stated and repeated, their count uniform in [KEY_DIGITS, the most that fit in
    `length` tokens]: the repeat's distance varies, so only content finds what to copy."""
    digits = "".join(str(d) for d in rng.integers(0, 10, 3 * length))
    low, high = KEY_DIGITS, 3 * length  # the digits of the longest text that fits: bisected
    while low < high:
      mid = (low + high + 1) // 2
      low, high = (mid, high) if self._fits(_repeat_text(digits[:mid]), length) else (low, mid - 1)
    return _repeat_text(digits[: rng.integers(KEY_DIGITS, low + 1)])

  def _text_within(self, index: int, budget: int, needles: int) -> str:
    """Document `index` built for a prompt of `budget` tokens less the later questions' room."""
    rng = np.random.default_rng([_STREAM, index])
    later_room = 2 * answer_room(asked_count(needles)) if needles > 1 else 0
    prompt = build_prompt(self._haystack, budget - later_room, rng.uniform(0, 100), needles, rng)
    others = [n for n in prompt.needles if n not in prompt.asked]
    later = question(others) + answer(others) if others else ""
    return prompt.text + prompt.answer + later


def _repeat_text(digits: str) -> str:
  return f"The pass key is {digits}. Again: {digits}."


def digit_token_ids(tokenizer) -> frozenset:
  """The ids of the tokens that are 1-3 digits (how Llama 3's tokenizer splits numbers)."""
  texts = {f"{i:0{w}d}" for w in (1, 2, 3) for i in range(10**w)}
  return frozenset(i for t in texts for i in tokenizer.encode(t, bos=False, eos=False))


def key_copies(ids: np.ndarray, digit_ids: frozenset) -> np.ndarray:
  """int32 [n] mask of the tokens of `ids` that copy a key: each run of digit tokens equal to an
  earlier run in the document, with the tokens right before it (the space that starts a key) and
  right after it (which ends the key)."""
  mask = np.zeros(len(ids), np.int32)
  seen, start = set(), None
  for i, token in enumerate(list(ids) + [-1]):
    if int(token) in digit_ids:
      start = i if start is None else start
      continue
    if start is not None:
      run = tuple(int(t) for t in ids[start:i])
      if run in seen:
        mask[max(start - 1, 0) : i + 1] = 1
      seen.add(run)
      start = None
  return mask
