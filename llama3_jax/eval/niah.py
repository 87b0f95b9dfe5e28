"""Needle-in-a-haystack evaluation (the paper's Sec. 3.4.2 / 5.2 check of long context): over a grid
of context lengths x needle depths, prompts of data/haystack.py are answered by greedy `generate` (on a
mesh: parameters in their shards, long prompts prefilled with context parallelism) and scored by
exact match; results as records and a heatmap like the paper's figure.

A record per length x depth: {"length", "depth", "needles", "asked", "score" (mean over the
samples, in [0, 1]), "samples", "prompt_tokens" (mean), "examples": the first sample's expected
answer and response}.
"""

import json
import os
from collections.abc import Sequence
from typing import Dict, List, Optional

import numpy as np
from absl import logging

from llama3_jax.config import ModelConfig, SamplingConfig
from llama3_jax.data.haystack import Haystack, answer_room, asked_count, build_prompt, score
from llama3_jax.inference.generate import generate
from llama3_jax.parallel.rules import batch_degree

GREEDY = SamplingConfig(temperature=0.0)
RESULTS_FILE = "results.jsonl"
HEATMAP_FILE = "heatmap.png"


def _generate_all(cfg: ModelConfig, params, prompts, max_new_tokens, stop_ids, mesh, batch_size):
  """Greedy responses (token ids) to `prompts`, `batch_size` at a time (the last batch filled with
  copies, so every call has one shape); on `mesh` when given."""
  out = []
  for start in range(0, len(prompts), batch_size):
    batch = list(prompts[start : start + batch_size])
    real = len(batch)
    batch += [batch[-1]] * (batch_size - real)
    responses = generate(
      cfg,
      params,
      batch,
      max_new_tokens=max_new_tokens,
      sampling=GREEDY,
      stop_ids=stop_ids,
      mesh=mesh,
    )
    out.extend(responses[:real])
  return out


def evaluate(
  cfg: ModelConfig,
  params: Dict,
  tokenizer,
  *,
  lengths: Sequence[int],
  depths: Sequence[float],
  needles: int = 1,
  samples: int = 4,
  haystack: str = "passkey",
  seed: int = 0,
  mesh=None,
  batch_size: int = 4,
) -> List[Dict]:
  """One record per length x depth (module docstring), `samples` prompts each with their own
  keys (drawn from `seed`, the length and the depth), answered `batch_size` at a time (rounded up
  to a multiple of the mesh's data x fsdp shards). `params` live on `mesh` when it is given. A length beyond the model's
  max_seq_len is evaluated too (a warning says so): retrieval past the trained length."""
  if needles < 1 or samples < 1 or batch_size < 1:
    raise ValueError(
      f"Need needles, samples and batch_size >= 1: {needles}, {samples}, {batch_size}"
    )
  if mesh is not None:  # whole rows per data x fsdp shard
    shards = batch_degree(mesh)
    batch_size = -(-batch_size // shards) * shards
  hay = Haystack.named(tokenizer, haystack)
  asked = asked_count(needles)
  room = answer_room(asked)
  records = []
  for length in lengths:
    if length > cfg.max_seq_len:
      logging.warning(
        "NIAH at %d tokens, beyond the model's max_seq_len %d", length, cfg.max_seq_len
      )
    prompts = [
      build_prompt(hay, length, depth, needles, np.random.default_rng([seed, length, d, s]))
      for d, depth in enumerate(depths)
      for s in range(samples)
    ]
    at_length = cfg.replace(max_seq_len=max(cfg.max_seq_len, length))
    responses = _generate_all(
      at_length,
      params,
      [p.ids for p in prompts],
      room,
      tuple(tokenizer.stop_ids),
      mesh,
      batch_size,
    )
    for d, depth in enumerate(depths):
      cell = range(d * samples, (d + 1) * samples)
      texts = [tokenizer.decode(responses[i]) for i in cell]
      scores = [score(prompts[i].asked, text) for i, text in zip(cell, texts)]
      record = dict(
        length=int(length),
        depth=float(depth),
        needles=needles,
        asked=asked,
        score=float(np.mean(scores)),
        samples=samples,
        prompt_tokens=float(np.mean([len(prompts[i].ids) for i in cell])),
        examples=[{"expected": prompts[cell[0]].answer, "response": texts[0]}],
      )
      records.append(record)
      logging.info(
        "NIAH length %d depth %g%% needles %d: score %.3f", length, depth, needles, record["score"]
      )
  return records


def write_records(records: Sequence[Dict], path: str, append: bool = False) -> None:
  """JSON lines, one record each; after the file's lines when `append`."""
  with open(path, "a" if append else "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def write_outputs(records: Sequence[Dict], output_dir: str, title: str) -> None:
  """`output_dir`/results.jsonl and `output_dir`/heatmap.png."""
  os.makedirs(output_dir, exist_ok=True)
  write_records(records, os.path.join(output_dir, RESULTS_FILE))
  write_heatmap(records, os.path.join(output_dir, HEATMAP_FILE), title)


def write_heatmap(records: Sequence[Dict], path: str, title: str = "Needle in a haystack") -> None:
  """A PNG of the scores: depth (rows, 0% at the top) x context length (columns), one panel per
  needle count, red (0) to green (1), each cell's score written in it."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  counts = sorted({r["needles"] for r in records})
  lengths = sorted({r["length"] for r in records})
  depths = sorted({r["depth"] for r in records})
  panel = max(3.6, 1.2 + 0.8 * len(lengths))
  fig, axes = plt.subplots(
    1, len(counts), figsize=(panel * len(counts) + 1.2, 1.4 + 0.45 * len(depths)), squeeze=False
  )
  for ax, count in zip(axes[0], counts):
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in records:
      if r["needles"] == count:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["score"]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      if np.isfinite(value):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths], fontsize=8)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=8)
    ax.set_xlabel("context length (tokens)", fontsize=8)
    ax.set_ylabel("needle depth", fontsize=8)
    asked = asked_count(count)
    ax.set_title(f"{count} needle{'s' if count > 1 else ''}, {asked} asked", fontsize=9)
  fig.suptitle(title, fontsize=10, y=1.02)
  fig.subplots_adjust(wspace=0.35)
  fig.colorbar(image, ax=axes[0].tolist(), label="exact match")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def _short(tokens: int) -> str:
  return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def parse_numbers(spec: str, what: str, kind=int) -> List:
  """ "512,1024" -> [512, 1024]; ValueError naming `what` otherwise."""
  try:
    values = [kind(x) for x in spec.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated numbers, got {spec!r}") from None
  if not values:
    raise ValueError(f"{what} is empty")
  return values


def scores_by_length(records: Sequence[Dict]) -> Dict[int, float]:
  """{length: mean score over its depths}."""
  out: Dict[int, List[float]] = {}
  for r in records:
    out.setdefault(r["length"], []).append(r["score"])
  return {length: float(np.mean(s)) for length, s in sorted(out.items())}


def summary(records: Sequence[Dict], needles: Optional[int] = None) -> str:
  """ "512: 1.00, 1024: 0.95" of the mean score per length."""
  chosen = [r for r in records if needles is None or r["needles"] == needles]
  return ", ".join(f"{n}: {s:.2f}" for n, s in scores_by_length(chosen).items())
