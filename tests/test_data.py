"""The data pipeline: packing against hand-computed rows, mixture, determinism, exact resume, sharding,
held-out split, malformed rows, the three source kinds and the embedded corpus."""

import json
import os

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from llama3_jax.config.data_config import BatchStage, DataConfig, DataSource, parse_ramp
from llama3_jax.data import (
  JsonLines,
  MalformedCounter,
  PackIterDataset,
  embedded_corpus,
  make_pipeline,
  open_source,
  stdlib_files,
)

BOS, EOS = 1, 2


class CharTokenizer:
  """One id per character (its code point); BOS = 1, EOS = 2."""

  bos_id, eos_id = BOS, EOS

  def encode(self, text, *, bos, eos):
    return [BOS] * bos + [ord(c) for c in text] + [EOS] * eos


def pack(docs, length):
  """All rows of PackIterDataset over `docs` (lists of ids)."""
  ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset()
  return list(PackIterDataset(ds, length))


def rows_of(batches):
  """The non-padding rows of a list of batches, in order."""
  return [
    {k: v[i] for k, v in b.items()}
    for b in batches
    for i in range(len(b["tokens"]))
    if b["segment_ids"][i].any()
  ]


def stitch(rows):
  """Documents (lists of ids, BOS..EOS) rebuilt from consecutive packed rows; checks the overlap."""
  docs, current = [], None
  for row in rows:
    for segment in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == segment
      tokens, start = row["tokens"][where].tolist(), int(row["positions"][where][0])
      assert row["positions"][where].tolist() == list(range(start, start + len(tokens)))
      if current is None:
        assert start == 0 and tokens[0] == BOS
        current = tokens
      else:  # a continued document resumes at its last token so far
        assert start == len(current) - 1 and tokens[0] == current[-1]
        current = current[:start] + tokens
      if current[-1] == EOS:
        docs.append(current)
        current = None
  assert current is None
  return docs


def text_of(doc):
  return "".join(map(chr, doc[1:-1]))


def write_jsonl(path, texts, field="text"):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps({field: t}) + "\n" for t in texts)
  return str(path)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


# Packing


def test_packing_matches_hand_computed_rows():
  a, b, c = [11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36, 37]
  rows = pack([a, b, c], 4)
  # Row 0 ends on b's first token, so row 1 starts b again; c continues from its last token so far.
  expected = [
    ([11, 12, 13, 21], [1, 1, 1, 2], [0, 1, 2, 0]),
    ([21, 22, 31, 32], [1, 1, 2, 2], [0, 1, 0, 1]),
    ([32, 33, 34, 35], [1, 1, 1, 1], [1, 2, 3, 4]),
    ([35, 36, 37, 0], [1, 1, 1, 0], [4, 5, 6, 0]),
  ]
  assert len(rows) == len(expected)
  for row, (tokens, segment_ids, positions) in zip(rows, expected):
    assert row["tokens"].tolist() == tokens
    assert row["segment_ids"].tolist() == segment_ids
    assert row["positions"].tolist() == positions
    assert all(v.dtype == np.int32 and v.shape == (4,) for v in row.values())


def test_packing_resumes_mid_document():
  docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36, 37]]
  ds = PackIterDataset(
    grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset(), 4
  )
  iterator = iter(ds)
  take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  assert state["offset"] == 1  # inside the long document
  rest = list(iterator)
  restored = iter(ds)
  restored.set_state(state)
  assert_batches_equal(list(restored), rest)


def test_no_target_crosses_a_document_and_every_pair_is_a_target_once():
  rng = np.random.default_rng(0)
  # Token 1000 * k + j is token j of document k, so ids tell document and position.
  docs = [
    [1000 * k + j for j in range(n)] for k, n in enumerate(rng.integers(1, 40, size=60), start=1)
  ]
  pairs = []
  for row in pack(docs, 16):
    seg, tokens, positions = row["segment_ids"], row["tokens"], row["positions"]
    real = seg > 0
    assert np.array_equal(positions[real], tokens[real] % 1000)
    valid = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)  # the train step's target mask
    inputs, targets = tokens[:-1][valid], tokens[1:][valid]
    assert np.array_equal(inputs // 1000, targets // 1000)
    pairs += list(zip(inputs.tolist(), targets.tolist()))
  expected = [(d[j], d[j + 1]) for d in docs for j in range(len(d) - 1)]
  assert sorted(pairs) == sorted(expected)


# The pipeline


@pytest.fixture
def three_sources(tmp_path):
  """Sources of 'a', 'b' and 'c' documents with different length ranges, weights 0.5/0.3/0.2."""
  rng = np.random.default_rng(1)
  sources = []
  for letter, (low, high), weight in (
    ("a", (5, 40), 0.5),
    ("b", (100, 400), 0.3),
    ("c", (20, 120), 0.2),
  ):
    texts = [letter * n for n in rng.integers(low, high, size=150)]
    sources.append(
      DataSource(write_jsonl(tmp_path / f"{letter}.jsonl", texts), "jsonl", weight=weight)
    )
  return tuple(sources)


def test_batches_follow_the_contract(three_sources):
  cfg = DataConfig(sources=three_sources, seq_len=32, global_batch_size=8)
  batch = next(make_pipeline(cfg, CharTokenizer()))
  assert sorted(batch) == ["positions", "segment_ids", "tokens"]
  assert all(v.shape == (8, 33) and v.dtype == np.int32 for v in batch.values())
  starts = batch["positions"] == 0
  assert np.all(batch["tokens"][starts & (batch["segment_ids"] > 0)] == BOS)


def test_mixture_follows_weights_in_tokens(three_sources):
  cfg = DataConfig(sources=three_sources, seq_len=128, global_batch_size=8)
  tokens = np.concatenate(
    [b["tokens"].ravel() for b in take(make_pipeline(cfg, CharTokenizer()), 120)]
  )
  counts = np.array([np.sum(tokens == ord(letter)) for letter in "abc"])
  np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.03)


def test_same_seed_same_batches_other_seed_other_batches(three_sources):
  cfg = DataConfig(sources=three_sources, seq_len=32, global_batch_size=4)
  first = take(make_pipeline(cfg, CharTokenizer()), 5)
  assert_batches_equal(take(make_pipeline(cfg, CharTokenizer()), 5), first)
  other = take(make_pipeline(cfg.replace(seed=1), CharTokenizer()), 5)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other))


@pytest.mark.parametrize("read_threads", [0, 2])
def test_resume_from_serialized_state_is_exact(tmp_path, read_threads):
  rng = np.random.default_rng(2)
  texts = [f"doc{k} " + "xyz" * int(n) for k, n in enumerate(rng.integers(1, 30, size=12))]
  sources = (
    DataSource(write_jsonl(tmp_path / "x.jsonl", texts), "jsonl", weight=2),
    DataSource(write_jsonl(tmp_path / "y.jsonl", texts[:5]), "jsonl"),
  )
  # Short rows and few documents: the state falls inside a document, a row window and a later epoch.
  cfg = DataConfig(
    sources=sources,
    seq_len=16,
    global_batch_size=4,
    row_shuffle_window=6,
    read_threads=read_threads,
  )
  iterator = make_pipeline(cfg, CharTokenizer())
  take(iterator, 23)
  checkpoint = json.dumps(iterator.get_state())
  expected = take(iterator, 9)
  restored = make_pipeline(cfg, CharTokenizer())
  restored.set_state(json.loads(checkpoint))
  assert_batches_equal(take(restored, 9), expected)


def test_processes_see_disjoint_documents_that_cover_all(tmp_path):
  texts = [chr(0x4E00 + k) + "z" * (k % 17) for k in range(41)]
  cfg = DataConfig(
    sources=(DataSource(write_jsonl(tmp_path / "d.jsonl", texts), "jsonl"),),
    seq_len=24,
    global_batch_size=4,
    num_epochs=1,
    row_shuffle_window=0,
  )  # rows in order, to stitch
  seen = []
  for process in range(2):
    batches = list(make_pipeline(cfg, CharTokenizer(), process_index=process, process_count=2))
    assert all(b["tokens"].shape == (2, 25) for b in batches)
    seen.append({text_of(doc) for doc in stitch(rows_of(batches))})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(texts)


def test_held_out_documents_form_the_eval_split(tmp_path):
  texts = [f"document {k}" for k in range(200)]
  cfg = DataConfig(
    sources=(DataSource(write_jsonl(tmp_path / "d.jsonl", texts), "jsonl"),),
    seq_len=40,
    global_batch_size=4,
    num_epochs=1,
    held_out_fraction=0.25,
    row_shuffle_window=0,
  )
  train = {text_of(d) for d in stitch(rows_of(list(make_pipeline(cfg, CharTokenizer()))))}
  eval_batches = list(make_pipeline(cfg, CharTokenizer(), split="eval"))
  held_out = {text_of(d) for d in stitch(rows_of(eval_batches))}
  assert not train & held_out and train | held_out == set(texts)
  assert 30 <= len(held_out) <= 70
  assert all(
    b["tokens"].shape == (4, 41) for b in eval_batches
  )  # the last batch padded with rows of 0s
  assert_batches_equal(
    list(make_pipeline(cfg.replace(seed=5), CharTokenizer(), split="eval")), eval_batches
  )
  with pytest.raises(ValueError, match="held_out_fraction"):
    make_pipeline(cfg.replace(held_out_fraction=0.0), CharTokenizer(), split="eval")


def test_pipeline_argument_errors(three_sources):
  cfg = DataConfig(sources=three_sources, global_batch_size=6)
  with pytest.raises(
    ValueError, match="global_batch_size=6 .* is not divisible by process_count=4"
  ):
    make_pipeline(cfg, CharTokenizer(), process_index=0, process_count=4)
  with pytest.raises(ValueError, match="split"):
    make_pipeline(cfg, CharTokenizer(), split="test")


# Sources and malformed rows

MALFORMED_LINES = [
  b'{"text": "first good"}',
  b'{"text": "broken',  # line 2: invalid JSON
  b'{"body": "no text field"}',
  b'{"text": 7}',
  b'{"text": "bad \xff byte"}',
  b'{"text": "  "}',
  b"",  # a blank line
  b'{"text": "second good"}',
]


@pytest.fixture
def malformed_jsonl(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(MALFORMED_LINES) + b"\n")
  return str(path)


def test_malformed_rows_are_counted_and_skipped(malformed_jsonl):
  counter = MalformedCounter()
  source = open_source(DataSource(malformed_jsonl, "jsonl"), counter=counter)
  assert [source[i] for i in range(len(source))] == ["first good"] + [None] * 6 + ["second good"]
  assert counter.counts() == {malformed_jsonl: 6} and counter.total == 6
  cfg = DataConfig(
    sources=(DataSource(malformed_jsonl, "jsonl"),),
    seq_len=64,
    global_batch_size=2,
    num_epochs=1,
    row_shuffle_window=0,
  )
  counter = MalformedCounter()
  docs = stitch(rows_of(list(make_pipeline(cfg, CharTokenizer(), counter=counter))))
  assert sorted(map(text_of, docs)) == ["first good", "second good"]
  assert counter.total == 6


def test_malformed_row_raises_naming_file_and_line(malformed_jsonl):
  source = open_source(DataSource(malformed_jsonl, "jsonl"), skip_malformed=False)
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
    source[1]
  with pytest.raises(ValueError, match=r"bad\.jsonl:5: not valid UTF-8"):
    source[4]
  cfg = DataConfig(
    sources=(DataSource(malformed_jsonl, "jsonl"),),
    skip_malformed=False,
    num_epochs=1,
    read_threads=2,
  )
  with pytest.raises(ValueError, match=r"bad\.jsonl:\d: "):
    list(make_pipeline(cfg, CharTokenizer()))


def test_source_with_only_malformed_rows_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", ["one", "two", "three"], field="body")
  cfg = DataConfig(sources=(DataSource(path, "jsonl", field="text"),))
  with pytest.raises(ValueError, match="Every document of source .*d.jsonl.* is malformed"):
    next(make_pipeline(cfg, CharTokenizer()))


def test_missing_path_names_the_pattern(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.jsonl")
  with pytest.raises(FileNotFoundError, match="nothing"):
    make_pipeline(DataConfig(sources=(DataSource(pattern, "jsonl"),)), CharTokenizer())


def test_text_jsonl_and_array_record_sources(tmp_path):
  os.makedirs(tmp_path / "texts" / "sub")
  (tmp_path / "texts" / "b.txt").write_text("second file")
  (tmp_path / "texts" / "sub" / "a.txt").write_text("nested file")
  texts = open_source(DataSource(str(tmp_path / "texts" / "**" / "*.txt"), "text"))
  assert list(texts) == ["second file", "nested file"]  # sorted paths

  path = write_jsonl(tmp_path / "d.jsonl", ["alpha", "beta"], field="body")
  assert list(open_source(DataSource(path, "jsonl", field="body"))) == ["alpha", "beta"]

  for name, field, records in (
    ("json", "text", [b'{"text": "gamma"}', b'{"text": "delta"}']),
    ("plain", "", ["epsilon".encode(), "\u00e9ta".encode()]),
  ):
    writer = ArrayRecordWriter(str(tmp_path / f"{name}.array_record"), "group_size:1")
    for record in records:
      writer.write(record)
    writer.close()
    source = open_source(
      DataSource(str(tmp_path / f"{name}.array_record"), "array_record", field=field)
    )
    assert len(source) == 2
    expected = [json.loads(r)["text"] for r in records] if field else [r.decode() for r in records]
    assert list(source) == expected

  sources = (
    DataSource(str(tmp_path / "texts" / "**" / "*.txt"), "text"),
    DataSource(path, "jsonl", field="body"),
    DataSource(str(tmp_path / "*.array_record"), "array_record", field="text"),
  )
  cfg = DataConfig(
    sources=sources, seq_len=32, global_batch_size=2, num_epochs=1, row_shuffle_window=0
  )
  docs = stitch(rows_of(list(make_pipeline(cfg, CharTokenizer()))))
  # json.array_record holds 2 documents; plain.array_record's records are not JSON: skipped.
  assert sorted(map(text_of, docs)) == [
    "alpha",
    "beta",
    "delta",
    "gamma",
    "nested file",
    "second file",
  ]


def test_jsonl_reader_handles_no_final_newline_and_several_files(tmp_path):
  (tmp_path / "1.jsonl").write_text('{"text": "a"}\n{"text": "b"}')
  (tmp_path / "2.jsonl").write_text('{"text": "c"}\n')
  source = JsonLines([str(tmp_path / "1.jsonl"), str(tmp_path / "2.jsonl")], "text")
  assert list(source) == ["a", "b", "c"]
  with pytest.raises(IndexError):
    source[3]


# The embedded corpus


def test_embedded_corpus_is_deterministic_and_several_megabytes():
  paths = stdlib_files()
  assert paths == stdlib_files() and len(paths) > 100
  assert sum(os.path.getsize(p) for p in paths) > 4_000_000
  assert not any("site-packages" in p.split(os.sep) for p in paths)
  corpus = embedded_corpus()
  assert len(corpus) == len(paths) and corpus[0] == embedded_corpus()[0] and corpus[0].strip()


def test_empty_corpus_is_an_error(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "notes.txt").write_text("not python")
  with pytest.raises(ValueError, match=f"empty.*{tmp_path}"):
    stdlib_files(str(tmp_path))


def test_embedded_corpus_with_the_real_tokenizer():
  from llama3_jax.tokenizer import Tokenizer

  tokenizer = Tokenizer.default()
  batch = next(make_pipeline(DataConfig(seq_len=64, global_batch_size=4), tokenizer))
  assert all(v.shape == (4, 65) and v.dtype == np.int32 for v in batch.values())
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() < tokenizer.vocab_size
  starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
  assert np.all(batch["tokens"][starts] == tokenizer.bos_id)


# Batch-size / sequence-length ramp


def test_ramp_changes_shape_at_the_token_counts(three_sources):
  # 2 x 16 = 32 tokens a batch until 96 tokens (3 batches), then 3 x 32 = 96 a batch until
  # 300 (3 more: 96 + 288 = 384 >= 300), then 2 x 8 rows.
  cfg = DataConfig(
    sources=three_sources, seq_len=16, global_batch_size=2, ramp=parse_ramp("96:3x32,300:2x8")
  )
  shapes = [b["tokens"].shape for b in take(make_pipeline(cfg, CharTokenizer()), 9)]
  assert shapes == [(2, 17)] * 3 + [(3, 33)] * 3 + [(2, 9)] * 3
  per_process = make_pipeline(
    cfg.replace(ramp=parse_ramp("96:4x32")), CharTokenizer(), process_index=1, process_count=2
  )
  assert [b["tokens"].shape for b in take(per_process, 5)] == [(1, 17)] * 3 + [(2, 33)] * 2
  with pytest.raises(ValueError, match="global_batch_size=3 .*token 96.* process_count=2"):
    make_pipeline(cfg, CharTokenizer(), process_count=2)


def test_ramp_continues_the_document_stream_across_row_lengths(tmp_path):
  texts = [f"doc{k}:" + "q" * (k * 7 % 50) for k in range(60)]
  cfg = DataConfig(
    sources=(DataSource(write_jsonl(tmp_path / "d.jsonl", texts), "jsonl"),),
    seq_len=24,
    global_batch_size=2,
    num_epochs=1,
    row_shuffle_window=0,
    ramp=parse_ramp("200:3x10,500:1x40"),
  )
  batches = list(make_pipeline(cfg, CharTokenizer()))
  assert {b["tokens"].shape for b in batches} == {(2, 25), (3, 11), (1, 41)}
  texts_read = [text_of(d) for d in stitch(rows_of(batches))]
  unramped = list(make_pipeline(cfg.replace(ramp=()), CharTokenizer()))
  assert texts_read == [text_of(d) for d in stitch(rows_of(unramped))]
  assert sorted(texts_read) == sorted(texts)


def test_ramp_resumes_exactly_from_any_batch(three_sources):
  cfg = DataConfig(
    sources=three_sources,
    seq_len=16,
    global_batch_size=2,
    row_shuffle_window=5,
    ramp=parse_ramp("96:3x32,300:2x8"),
  )
  iterator = make_pipeline(cfg, CharTokenizer())
  states, batches = [], []
  for _ in range(10):
    states.append(json.dumps(iterator.get_state()))
    batches.append(next(iterator))
  for start in (2, 3, 5, 6, 8):
    restored = make_pipeline(cfg, CharTokenizer())
    restored.set_state(json.loads(states[start]))
    assert_batches_equal(take(restored, 10 - start), batches[start:])
  shorter = make_pipeline(cfg.replace(ramp=cfg.ramp[:1]), CharTokenizer())
  with pytest.raises(ValueError, match="stage 2; this ramp has 2 stages"):
    shorter.set_state(json.loads(states[8]))


def test_ramp_config_errors():
  assert parse_ramp("252e6:1024x8192, 2.87e12:2048x8192") == (
    BatchStage(252_000_000, 1024, 8192),
    BatchStage(2_870_000_000_000, 2048, 8192),
  )
  with pytest.raises(ValueError, match="Bad ramp stage '1e6:1024'"):
    parse_ramp("1e6:1024")
  with pytest.raises(ValueError, match="BatchStage.seq_len"):
    parse_ramp("10:2x0")
  with pytest.raises(ValueError, match="increasing token counts > 0, got \\[20, 10\\]"):
    DataConfig(ramp=parse_ramp("20:1x2,10:1x2"))
  cfg = DataConfig(ramp=parse_ramp("252e6:1024x8192"))
  assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert cfg.stage_config(1) == DataConfig(global_batch_size=1024, seq_len=8192)


# Config


@pytest.mark.parametrize(
  "kwargs,field",
  [
    (dict(path_pattern="", kind="text"), "path_pattern"),
    (dict(path_pattern="x", kind="parquet"), "kind"),
    (dict(path_pattern="x", kind="text", weight=0), "weight"),
    (dict(path_pattern="x", kind="jsonl", field=""), "field"),
  ],
)
def test_data_source_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"DataSource.{field}"):
    DataSource(**kwargs)


@pytest.mark.parametrize(
  "kwargs,field",
  [
    (dict(seq_len=0), "seq_len"),
    (dict(global_batch_size=-1), "global_batch_size"),
    (dict(seed=-1), "seed"),
    (dict(held_out_fraction=1.0), "held_out_fraction"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(read_threads=-1), "read_threads"),
    (dict(sources=("a.txt",)), "sources"),
  ],
)
def test_data_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"DataConfig.{field}"):
    DataConfig(**kwargs)


def test_data_config_round_trips_through_a_dict():
  cfg = DataConfig(
    sources=(DataSource("a/*.jsonl", "jsonl", weight=0.5), DataSource("b", "text")), seed=3
  )
  assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ValueError, match="Unknown DataConfig fields"):
    DataConfig.from_dict({"seq_length": 3})
