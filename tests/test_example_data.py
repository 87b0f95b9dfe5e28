"""The example files of README's data formats (experiments/example_data/) are read by the parsers of
the binaries that take them, every row usable (a bad row would be an error here), and the
pretraining and SFT ones make batches."""

import os

import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import DataConfig, DataSource
from llama3_jax.data import make_pipeline
from llama3_jax.data.chat import (
  parse_preference_row,
  parse_prompt_row,
  parse_sft_row,
  read_jsonl,
)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "example_data")
TOKENIZER = l3.Tokenizer.default()


def _example(name):
  return os.path.join(EXAMPLES, name)


@pytest.mark.parametrize(
  "name, parse, rows",
  [
    ("chat.jsonl", parse_sft_row, 3),
    ("preferences.jsonl", parse_preference_row, 4),
    ("prompts.jsonl", parse_prompt_row, 2),
  ],
)
def test_every_row_of_an_example_parses(name, parse, rows):
  assert len(list(read_jsonl(_example(name), parse, skip_bad=False))) == rows


def test_the_example_preferences_rank_their_responses():
  ranked = [p.ranked for p in read_jsonl(_example("preferences.jsonl"), parse_preference_row)]
  assert [len(r) for r in ranked] == [2, 3, 2, 2]  # "edited" ranks above "chosen"
  assert [m.content for m in ranked[3]] == ["Lima.", "Cusco."]  # TRL's implicit prompt


@pytest.mark.parametrize(
  "name, kind", [("text.txt", "text"), ("documents.jsonl", "jsonl"), ("chat.jsonl", "chat")]
)
def test_the_pretraining_and_sft_examples_make_batches(name, kind):
  data = DataConfig(
    sources=(DataSource(_example(name), kind),),
    seq_len=32,
    global_batch_size=2,
    held_out_fraction=0.0,
    num_epochs=1,
    skip_malformed=False,
  )
  batch = next(iter(make_pipeline(data, TOKENIZER)))  # rows of seq_len + 1: inputs and targets
  assert batch["tokens"].shape == (2, 33) and np.any(batch["tokens"] == TOKENIZER.bos_id)
