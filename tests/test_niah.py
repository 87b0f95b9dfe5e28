"""Needle in a haystack: prompts built with the real tokenizer (lengths, depths, needles asked),
exact-match scoring, the harness on a context-parallel mesh equal to one device, and the binary's
contract (results.jsonl, heatmap.png) with a random-weight model scoring about 0."""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.data.haystack import (
  FILLER,
  Haystack,
  Needle,
  answer,
  answer_room,
  build_prompt,
  question,
  score,
)
from llama3_jax.eval import niah
from llama3_jax.parallel import init_sharded_params, make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
  return l3.Tokenizer.default()


@pytest.mark.parametrize("length", [256, 1000, 4096])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_one_needle_sits_at_its_depth_in_a_prompt_of_the_length(tokenizer, length, depth):
  haystack = Haystack.named(tokenizer, "passkey")
  prompt = build_prompt(haystack, length, depth, 1, np.random.default_rng(0))
  room = length - answer_room(1)
  longest_piece = max(haystack.tokens)
  assert room - 2 * longest_piece <= len(prompt.ids) <= room
  assert list(prompt.ids) == tokenizer.encode(prompt.text, bos=True, eos=False)
  [needle] = prompt.needles
  assert prompt.asked == (needle,) and len(needle.key) == 5
  assert prompt.text.count(needle.key) == 2  # the needle states its key twice
  assert prompt.text.endswith(question([needle]))
  filler_start = 0
  filler_end = prompt.text.index("\nWhat is")
  at = prompt.text.index(needle.sentence.strip())
  share = (at - filler_start) / (filler_end - len(needle.sentence) - filler_start)
  assert abs(100 * share - depth) <= 100 * 30 / filler_end + 1  # within a filler sentence


def test_four_needles_two_asked_on_distinct_doors(tokenizer):
  haystack = Haystack.named(tokenizer, "passkey")
  prompt = build_prompt(haystack, 2048, 50, 4, np.random.default_rng(3))
  doors = [n.door for n in prompt.needles]
  assert len(prompt.needles) == 4 and len(set(doors)) == 4 and len(prompt.asked) == 2
  assert set(prompt.asked) <= set(prompt.needles)
  for needle in prompt.needles:
    assert prompt.text.count(needle.sentence.strip()) == 1
  assert len(prompt.ids) <= 2048 - answer_room(2)
  positions = sorted(
    prompt.text.index(n.sentence.strip()) / len(prompt.text) for n in prompt.needles
  )
  assert 0.25 < positions[0] and positions[-1] < 0.75  # around the middle, 10 points apart


def test_exact_match_scores():
  one = [Needle("red", "48213")]
  assert score(one, " 48213.") == 1.0
  assert score(one, "48213 and more") == 1.0
  assert score(one, " 482130.") == 0.0  # a longer number is not the key
  assert score(one, " 4821.") == 0.0
  assert score(one, " The key is 48213.") == 0.0  # the key must come first
  two = [Needle("red", "48213"), Needle("blue", "00711")]
  assert score(two, answer(two)) == 1.0
  assert score(two, " 48213. The pass key of the blue door is 00712.") == 0.5
  assert score(two, " 11111. The pass key of the blue door is 00711.") == 0.5
  assert score(two, " 48213. The pass key of the red door is 00711.") == 0.5


def test_haystacks_of_files_and_of_the_embedded_corpus(tokenizer, tmp_path):
  (tmp_path / "essay.txt").write_text("Alpha beta gamma.\nDelta epsilon.\n" * 50)
  from_files = Haystack.named(tokenizer, str(tmp_path / "*.txt"))
  prompt = build_prompt(from_files, 300, 50, 1, np.random.default_rng(0))
  assert "Delta epsilon." in prompt.text and len(prompt.ids) <= 300 - answer_room(1)
  embedded = Haystack.named(tokenizer, "embedded")
  assert len(embedded.pieces) > 10_000
  assert Haystack.named(tokenizer, "passkey").pieces == list(FILLER)
  with pytest.raises(FileNotFoundError):
    Haystack.named(tokenizer, str(tmp_path / "missing*.txt"))
  with pytest.raises(ValueError, match="cannot hold"):
    build_prompt(from_files, 20, 50, 4, np.random.default_rng(0))


def test_niah_on_a_context_parallel_mesh_answers_as_one_device(tokenizer):
  """Random tiny weights: the greedy responses (hence scores) on fsdp=2 x context=4, prompts of
  up to max_seq_len tokens prefilled split over context, equal those of one device."""
  cfg = l3.get_config("tiny", max_seq_len=512)  # prompts as long as the model allows
  params = l3.init_params(cfg, jax.random.key(0))
  grid = dict(lengths=[512], depths=[0, 100], needles=4, samples=2, batch_size=2)
  single = niah.evaluate(cfg, params, tokenizer, **grid)
  mesh = make_mesh(MeshConfig.parse("fsdp=2,context=4"))
  sharded = init_sharded_params(cfg, mesh, jax.random.key(0))
  split = niah.evaluate(cfg, sharded, tokenizer, mesh=mesh, **grid)
  assert [r["examples"] for r in split] == [r["examples"] for r in single]
  assert [r["score"] for r in split] == [r["score"] for r in single]


def _niah(*flags) -> subprocess.CompletedProcess:
  """experiments/niah.py on one CPU device."""
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", "niah.py"), "--config=tiny", *flags],
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    capture_output=True,
    text=True,
    timeout=900,
  )


def test_the_binary_writes_results_and_a_heatmap_and_random_weights_score_about_zero(tmp_path):
  out = tmp_path / "niah"
  done = _niah(
    "--lengths=256,512",
    "--depths=0,50,100",
    "--needles=1,4",
    "--niah_samples=2",
    f"--output_dir={out}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in open(out / "results.jsonl")]
  cells = [(r["length"], r["depth"], r["needles"]) for r in records]
  assert sorted(cells) == sorted(
    (n, d, k) for n in (256, 512) for d in (0.0, 50.0, 100.0) for k in (1, 4)
  )
  assert all(0.0 <= r["score"] <= 1.0 and r["samples"] == 2 for r in records)
  assert np.mean([r["score"] for r in records]) <= 0.1
  assert all(r["prompt_tokens"] <= r["length"] for r in records)
  with open(out / "heatmap.png", "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and min(struct.unpack(">II", head[16:24])) > 100
  assert "mean score by length" in done.stdout


def test_bad_grids_are_named(tmp_path):
  done = _niah("--depths=0,150", f"--output_dir={tmp_path}")
  assert done.returncode == 2
  assert "niah.py: error: Needle depth must be in [0, 100] percent, got 150" in done.stderr
