"""Needle-in-a-haystack texts: pass keys (the needles) hidden at given depths in filler text (the
haystack), a question at the end, and the exact-match score of an answer.

One needle: "The pass key of the red door is 48213. Remember it. 48213 is the pass key of the red
door." (the pass-key test's needle, which states its key twice) asked as "What is the pass key of
the red door? The pass key of the red door is" -> " 48213.". Several needles (the paper's
multi-needle test: 4 inserted, 2 asked) carry different door names; the question asks for two and
the answer gives both in order. The same texts are the NIAH prompts (eval/niah.py) and, with their
answers, the synthetic `passkey` training documents (passkey.py), so that a model taught on
one is scored on the other.

Haystacks: "passkey" repeats the filler of the pass-key retrieval test (Mohtashami and Jaggi,
2023: "The grass is green. The sky is blue. ..."); "embedded" uses the lines of the embedded corpus
(the standard library's sources); any other name is a glob of text files whose lines are used.
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Optional

import numpy as np

from llama3_jax.data.corpus import stdlib_files
from llama3_jax.data.sources import expand_pattern

FILLER = (
  " The grass is green.",
  " The sky is blue.",
  " The sun is yellow.",
  " Here we go.",
  " There and back again.",
)
DOORS = ("red", "blue", "green", "gold", "grey", "pink", "teal", "white")
KEY_DIGITS = 5
# Haystack text read from files, at most (characters): enough for 128K-token prompts.
MAX_HAYSTACK_CHARS = 2_000_000


@dataclasses.dataclass(frozen=True)
class Needle:
  door: str
  key: str

  @property
  def sentence(self) -> str:
    return (
      f" The pass key of the {self.door} door is {self.key}. Remember it. {self.key} is the pass"
      f" key of the {self.door} door."
    )


def question(asked: Sequence[Needle]) -> str:
  """The question after the haystack, ending where the first key is to be written."""
  first = f"The pass key of the {asked[0].door} door is"
  if len(asked) == 1:
    return f"\nWhat is the pass key of the {asked[0].door} door? {first}"
  doors = " and ".join(f"the {n.door} door" for n in asked)
  return f"\nWhat are the pass keys of {doors}? {first}"


def answer(asked: Sequence[Needle]) -> str:
  """The expected continuation of `question(asked)`."""
  rest = "".join(f" The pass key of the {n.door} door is {n.key}." for n in asked[1:])
  return f" {asked[0].key}.{rest}"


def score(asked: Sequence[Needle], response: str) -> float:
  """Exact match, in [0, 1]: the share of the asked keys the response gives, the first as its
  leading number, each later one as the number after "pass key of the <door> door is"."""
  first = re.match(r"\s*(\d+)", response)
  found = [first.group(1) if first else None]
  for needle in asked[1:]:
    later = re.search(rf"pass key of the {needle.door} door is\s*(\d+)", response)
    found.append(later.group(1) if later else None)
  return sum(got == n.key for got, n in zip(found, asked)) / len(asked)


def needle_depths(depth: float, count: int) -> list[float]:
  """Depths (percent of the haystack) of `count` needles around `depth`: one needle at `depth`;
  several 10 points apart, centred on it, clipped to [0, 100]."""
  offsets = (np.arange(count) - (count - 1) / 2) * 10.0
  return [float(np.clip(depth + o, 0.0, 100.0)) for o in offsets]


def draw_needles(rng: np.random.Generator, count: int) -> list[Needle]:
  """`count` needles on distinct doors with random keys of KEY_DIGITS digits."""
  doors = rng.choice(len(DOORS), size=count, replace=False)
  return [Needle(DOORS[d], "".join(str(x) for x in rng.integers(0, 10, KEY_DIGITS))) for d in doors]


def answer_room(asked: int) -> int:
  """Tokens kept free after a prompt for the answer to `asked` needles (and a document's EOS)."""
  return 8 + 16 * (asked - 1)


def asked_count(needles: int) -> int:
  """Needles asked of `needles` inserted: 1 of 1, 2 of several (the paper's multi-needle test)."""
  return 1 if needles == 1 else 2


class Haystack:
  """Filler pieces (sentences or lines, each carrying its leading space or its newline) and their
  token counts, cycled to fill a prompt to a number of tokens."""

  def __init__(self, tokenizer, pieces: Sequence[str], name: str):
    pieces = [p for p in pieces if p.strip()]
    if not pieces:
      raise ValueError(f"Haystack {name!r} has no text")
    self.name, self.tokenizer, self.pieces = name, tokenizer, list(pieces)
    self.tokens = np.array([len(tokenizer.encode(p, bos=False, eos=False)) for p in pieces])

  @classmethod
  def named(cls, tokenizer, name: str) -> "Haystack":
    """ "passkey", "embedded" or a glob of text files (see the module docstring)."""
    if name == "passkey":
      return cls(tokenizer, FILLER, name)
    paths = stdlib_files() if name == "embedded" else expand_pattern(name)
    lines, size = [], 0
    for path in paths:
      with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(MAX_HAYSTACK_CHARS - size)
      lines.extend(text.splitlines(keepends=True))
      size += len(text)
      if size >= MAX_HAYSTACK_CHARS:
        break
    return cls(tokenizer, lines, name)

  def fill(self, tokens: int, start: int) -> list[str]:
    """Pieces from `start` on (cycling) whose token counts sum to at most `tokens`."""
    chosen, total, i = [], 0, start
    while total + self.tokens[i % len(self.pieces)] <= tokens:
      chosen.append(self.pieces[i % len(self.pieces)])
      total += self.tokens[i % len(self.pieces)]
      i += 1
    return chosen


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  """A prompt of at most `length - answer_room(len(asked))` tokens: `ids` (with BOS), its `text`, the
  `needles` inserted and the ones `asked`."""

  length: int
  depth: float
  needles: tuple[Needle, ...]
  asked: tuple[Needle, ...]
  text: str
  ids: tuple[int, ...]

  @property
  def answer(self) -> str:
    return answer(self.asked)


def build_prompt(
  haystack: Haystack,
  length: int,
  depth: float,
  needles: int,
  rng: np.random.Generator,
  asked: Optional[int] = None,
) -> NeedlePrompt:
  """`needles` needles at `depth` percent (see `needle_depths`) of a haystack that fills a prompt
  to `length` tokens less the answer's room, `asked` of them (default `asked_count`) questioned at
  the end. ValueError when `length` cannot hold the needles, the question and the answer."""
  if not 0 <= depth <= 100:
    raise ValueError(f"Needle depth must be in [0, 100] percent, got {depth}")
  asked = asked_count(needles) if asked is None else asked
  if not 1 <= asked <= needles <= len(DOORS):
    raise ValueError(f"Need 1 <= asked ({asked}) <= needles ({needles}) <= {len(DOORS)}")
  tokenizer = haystack.tokenizer
  inserted = draw_needles(rng, needles)
  chosen = [inserted[i] for i in sorted(rng.choice(needles, size=asked, replace=False))]
  room = length - answer_room(asked)
  fixed = "".join(n.sentence for n in inserted) + question(chosen)
  budget = room - len(tokenizer.encode(fixed, bos=True, eos=False))
  if budget < 0:
    raise ValueError(f"A prompt of {length} tokens cannot hold {needles} needles and the question")
  pieces = haystack.fill(budget, int(rng.integers(len(haystack.pieces))))
  while True:
    text = _insert(pieces, inserted, needle_depths(depth, needles)) + question(chosen)
    ids = tokenizer.encode(text, bos=True, eos=False)
    if len(ids) <= room or not pieces:  # tokens merged across pieces can differ from the counts
      break
    pieces = pieces[:-1]
  return NeedlePrompt(length, depth, tuple(inserted), tuple(chosen), text, tuple(ids))


def _insert(pieces: Sequence[str], needles: Sequence[Needle], depths: Sequence[float]) -> str:
  """The pieces with each needle after the piece boundary nearest to its depth."""
  at = [round(d / 100 * len(pieces)) for d in depths]
  out = []
  for i in range(len(pieces) + 1):
    out.extend(n.sentence for n, a in zip(needles, at) if a == i)
    if i < len(pieces):
      out.append(pieces[i])
  return "".join(out).lstrip(" ")
