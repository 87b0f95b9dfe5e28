"""A bad data row, of any kind, is that row's error: skipped and counted (naming file:line and the
reason) or, when asked, fatal with the same words; never a bare exception from deep inside. Rows
of each kind the adversarial review found: a `"tool_calls": 5`, a `"code": 5`, JSON nested 100k
deep, bytes that are not UTF-8, a line too long."""

import json

import pytest

import llama3_jax as l3
from llama3_jax.config import DataConfig, DataSource
from llama3_jax.data import MalformedCounter, make_pipeline
from llama3_jax.data.chat import parse_preference_row, read_jsonl
from llama3_jax.data.sources import open_source

TOKENIZER = l3.Tokenizer.default()
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_ROWS = {  # line number (1-based) in the file -> what is wrong with it
  2: json.dumps({"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}),
  4: json.dumps({"messages": [{"role": "user", "content": "x", "code": 5}], "code": 5}),
  6: "[" * 100_000 + "]" * 100_000,
}


def _chat_file(path, bad_rows):
  lines = [json.dumps(GOOD)] * 8
  for number, row in bad_rows.items():
    lines[number - 1] = row
  path.write_text("\n".join(lines) + "\n")
  return path


def _pipeline(path, skip, epochs=1):
  data = DataConfig(
    sources=(DataSource(str(path), "chat"),),
    seq_len=32,
    global_batch_size=2,
    held_out_fraction=0.0,
    num_epochs=epochs,
    skip_malformed=skip,
  )
  counter = MalformedCounter()
  return make_pipeline(data, TOKENIZER, counter=counter), counter


def test_bad_sft_rows_are_skipped_and_counted_once(tmp_path, caplog):
  path = _chat_file(tmp_path / "chat.jsonl", BAD_ROWS)
  batches, counter = _pipeline(path, skip=True, epochs=3)
  assert list(batches)  # the good rows train
  assert counter.counts() == {str(path): len(BAD_ROWS)}  # each read 3 times, counted once
  logged = [r.getMessage() for r in caplog.records if "Skipping malformed" in r.getMessage()]
  assert sorted(m.split(": ")[0] for m in logged) == [
    f"Skipping malformed document {path}:{line}" for line in sorted(BAD_ROWS)
  ]


@pytest.mark.parametrize("line", sorted(BAD_ROWS))
def test_a_bad_sft_row_is_fatal_when_asked_and_named(tmp_path, line):
  path = _chat_file(tmp_path / "chat.jsonl", {line: BAD_ROWS[line]})
  batches, _ = _pipeline(path, skip=False)
  with pytest.raises(ValueError, match=f"chat.jsonl:{line}: not a dialog"):
    list(batches)


def test_bad_pretraining_rows_name_file_and_line(tmp_path):
  path = tmp_path / "docs.jsonl"
  with open(path, "wb") as f:
    f.write(json.dumps({"text": "fine"}).encode() + b"\n")
    f.write(b'{"text": "\xff\xfe"}\n')
    f.write(b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
  source = open_source(DataSource(str(path), "jsonl"), skip_malformed=False)
  assert source[0] == "fine"
  with pytest.raises(ValueError, match="docs.jsonl:2: not valid UTF-8"):
    source[1]
  with pytest.raises(ValueError, match="docs.jsonl:3: .*nested deeper than the parser allows"):
    source[2]


def test_bad_preference_rows_name_file_and_line(tmp_path):
  good = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
  path = tmp_path / "prefs.jsonl"
  with open(path, "wb") as f:
    f.write(json.dumps(good).encode() + b"\n")
    f.write(b"\xff not text\n")
    f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    f.write(json.dumps(dict(good, chosen=5)).encode() + b"\n")
  with pytest.raises(ValueError, match="prefs.jsonl:2: UnicodeDecodeError"):
    list(read_jsonl(str(path), parse_preference_row))
  kept = list(read_jsonl(str(path), parse_preference_row, skip_bad=True))
  assert len(kept) == 1 and kept[0].ranked[0].content == "a"
  lines = path.read_bytes().split(b"\n")
  path.write_bytes(b"\n".join([lines[0], lines[2]]) + b"\n")
  with pytest.raises(ValueError, match="prefs.jsonl:2: RecursionError: JSON nested too deep"):
    list(read_jsonl(str(path), parse_preference_row))
