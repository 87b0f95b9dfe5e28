"""The long-context extension: stages as config (closed forms), long-document data, stage switching
with exact resume inside and across stages on changing meshes, and the binary end to end."""

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys

import grain
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import (
  PAPER_LONG_CONTEXT,
  CheckpointConfig,
  DataConfig,
  DataSource,
  LongContextConfig,
  LongContextStage,
  MeshConfig,
  OptimizerConfig,
  RunConfig,
  TrainConfig,
)
from llama3_jax.data import make_pipeline
from llama3_jax.data.corpus import FILE_SEPARATOR, embedded_packages, stdlib_packages
from llama3_jax.data.haystack import KEY_DIGITS
from llama3_jax.data.packing import WHOLE, PackIterDataset
from llama3_jax.data.passkey import PasskeyDocuments, digit_token_ids, key_copies
from llama3_jax.train.long_context import StageEvaluation, stage_runs
from llama3_jax.train.loop import train_run
from llama3_jax.train.metrics import MetricsOutputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
  return l3.Tokenizer.default()


def test_the_paper_plan_holds_the_batch_in_tokens_from_16k_to_128k():
  plan = PAPER_LONG_CONTEXT
  lengths = [s.seq_len for s in plan.stages]
  assert lengths == [16384, 32768, 49152, 65536, 98304, 131072]
  assert [plan.rows(i) * L for i, L in enumerate(lengths)] == [plan.tokens_per_step] * 6
  assert plan.rows(5) == 120 and plan.tokens_per_step // 8192 == 1920
  assert abs(plan.total_tokens - 800e9) < 0.001 * 800e9
  ramp = plan.ramp()
  assert [s.start_tokens for s in ramp] == [i * plan.stages[0].tokens for i in range(6)]
  assert plan.end_step(5) == plan.total_steps == 6 * plan.steps(0)


def test_stage_specs_parse_and_bad_plans_are_named():
  stage = LongContextStage.parse("4096:6.5536e4@fsdp=2,context=2")
  assert (stage.seq_len, stage.tokens, stage.mesh.context, stage.mesh.fsdp) == (4096, 65536, 2, 2)
  assert LongContextStage.parse("1024:8192").mesh is None
  with pytest.raises(ValueError, match="expected SEQ_LEN:TOKENS"):
    LongContextStage.parse("1024")
  with pytest.raises(ValueError, match="not a multiple of its seq_len=3000"):
    LongContextConfig((LongContextStage(3000, 8192),), 8192)
  with pytest.raises(ValueError, match="not a whole number of steps"):
    LongContextConfig((LongContextStage(1024, 10000),), 8192)
  round_trip = LongContextConfig.from_dict(json.loads(json.dumps(PAPER_LONG_CONTEXT.to_dict())))
  assert round_trip == PAPER_LONG_CONTEXT


def test_whole_documents_start_a_row_when_they_do_not_fit():
  """Documents of 5, 4, 9 and 3 tokens in rows of 8: the 4-token one would straddle the first row's
  end, so it starts the second; the 9-token one is longer than a row, so it starts a row and is
  cut as usual (its second piece repeats the last token of the first); plain documents are cut."""
  sizes = (5, 4, 9, 3)
  docs = [np.arange(100 * (i + 1), 100 * (i + 1) + n, dtype=np.int32) for i, n in enumerate(sizes)]

  def rows(whole):
    source = grain.MapDataset.source(
      [{"tokens": d, WHOLE: True} if whole else d for d in docs]
    ).to_iter_dataset()
    return list(PackIterDataset(source, 8))

  kept = rows(whole=True)
  assert [r["tokens"].tolist() for r in kept] == [
    [100, 101, 102, 103, 104, 0, 0, 0],
    [200, 201, 202, 203, 0, 0, 0, 0],
    [300, 301, 302, 303, 304, 305, 306, 307],
    [307, 308, 400, 401, 402, 0, 0, 0],
  ]
  assert kept[3]["positions"].tolist() == [7, 8, 0, 1, 2, 0, 0, 0]
  assert kept[0]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  cut = rows(whole=False)
  assert cut[0]["tokens"].tolist() == [100, 101, 102, 103, 104, 200, 201, 202]


def test_the_package_corpus_is_each_package_concatenated():
  packages = stdlib_packages()
  corpus = embedded_packages()
  assert len(corpus) == len(packages) >= 20
  names = [os.path.basename(d) for d, _ in packages]
  assert {"email", "json", "asyncio"} <= set(names)
  index = names.index("json")
  directory, paths = packages[index]
  texts = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  assert corpus[index] == FILE_SEPARATOR.join(texts)
  assert corpus.where(index) == directory


def test_passkey_documents_are_fixed_whole_and_answer_themselves(tokenizer):
  """Each haystack and needle list ends with the answer to its question: the keys of the asked
  doors, as its needles give them; each repeat states its digits twice, their count random; lengths
  within the bounds; shorter than a row, whole."""
  source = PasskeyDocuments(tokenizer, 300, min_tokens=128)
  again = PasskeyDocuments(tokenizer, 300, min_tokens=128)
  lengths, repeated = [], []
  for i in range(18):
    text = source[i]
    assert text == again[i]
    lengths.append(len(tokenizer.encode(text, bos=True, eos=True)))
    if i % 8 >= 2:
      first, second = re.fullmatch(r"The pass key is (\d+)\. Again: (\d+)\.", text).groups()
      assert first == second and len(first) >= KEY_DIGITS
      repeated.append(len(first))
      continue
    haystack, _, asked = text.rpartition("\nWhat ")
    needles = re.findall(r"The pass key of the (\w+) door is (\d+)\. Remember it\. \2 is", haystack)
    doors = re.findall(r"the (\w+) door", asked.split("?")[0])
    answers = re.findall(r"door is (\d+)\.", asked.split("?")[1])
    assert len(set(d for d, _ in needles)) == len(needles) and len(doors) == len(answers)
    assert answers == [dict(needles)[d] for d in doors]
    if i % 8 == 0:
      assert len(needles) == (1 if i % 16 == 0 else 4)
      assert haystack.count("The grass is green.") >= 1
    else:  # a needle list: nothing but needles, as many as fit
      assert 3 <= len(needles) <= 8 and "grass" not in haystack
  assert 128 - 32 <= min(lengths[i] for i in range(18) if i % 8 < 2) and max(lengths) <= 300
  assert len(set(repeated)) >= len(repeated) - 2  # no fixed distance between a key and its copy
  data = DataConfig(sources=(DataSource("passkey", "passkey"),), seq_len=255, global_batch_size=4)
  batch = next(make_pipeline(data, tokenizer))
  for row in range(4):  # documents shorter than a row start at a row's first token
    assert batch["positions"][row, 0] == 0


def test_passkey_documents_teach_only_the_keys_they_copy(tokenizer):
  """The learned tokens (targets) of a pass-key document are its later mentions of each key, with
  the space before and the token after; a text source mixed in learns every token."""
  digits = digit_token_ids(tokenizer)
  assert len(digits) == 1110 and tokenizer.encode("482", bos=False, eos=False)[0] in digits
  text = "The pass key of the red door is 48213. Remember it. 48213 is the pass key."
  ids = np.array(tokenizer.encode(text + " What? It is 48213.", bos=True, eos=True))
  learned = [tokenizer.decode([int(t)]) for t in ids[key_copies(ids, digits) == 1]]
  assert learned == [" ", "482", "13", " is", " ", "482", "13", "."]
  assert not key_copies(
    np.array(tokenizer.encode("Keys 123 and 456.", bos=True, eos=True)), digits
  ).any()
  data = DataConfig(
    sources=(
      DataSource("passkey", "passkey", weight=0.5),
      DataSource("embedded:stdlib", "text", weight=0.5),
    ),
    seq_len=255,
    global_batch_size=8,
  )
  batch = next(make_pipeline(data, tokenizer))
  passkey_docs = text_docs = 0
  for tokens, segments, targets in zip(batch["tokens"], batch["segment_ids"], batch["targets"]):
    for segment in set(segments[segments > 0].tolist()):
      part = segments == segment
      if "pass key" in tokenizer.decode(tokens[part].tolist()):
        passkey_docs += 1
        np.testing.assert_array_equal(targets[part], key_copies(tokens[part], digits))
      else:
        text_docs += 1
        assert targets[part].all()
  assert passkey_docs and text_docs


EVALUATION = StageEvaluation(short_seq_len=32, depths=(0.0, 100.0), needles=())  # no NIAH


def _plan_run(directory, tokenizer, stage_meshes=("fsdp=8", "fsdp=4,context=2"), **evaluation):
  """Two stages, 256 tokens per step: 8 rows of 32 tokens for 3 steps, then 4 rows of 64 for 3
  steps on a mesh with context parallelism."""
  plan = LongContextConfig(
    (
      LongContextStage(32, 768, MeshConfig.parse(stage_meshes[0])),
      LongContextStage(64, 768, MeshConfig.parse(stage_meshes[1])),
    ),
    256,
  )
  run = RunConfig(
    model=l3.get_config("tiny"),
    optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=1, decay_steps=6),
    data=DataConfig(
      sources=(
        DataSource("embedded:packages", "text", 0.5, whole_documents=True),
        DataSource("embedded:stdlib", "text", 0.5),
      ),
      seq_len=32,
      global_batch_size=8,
    ),
    train=TrainConfig(steps=6, log_every=1),
    checkpoint=CheckpointConfig(directory=str(directory), save_every=100),
  )
  return plan, stage_runs(run, plan, dataclasses.replace(EVALUATION, **evaluation), tokenizer)


def _records(path):
  with open(path) as f:
    return {r["step"]: r for r in map(json.loads, f.read().splitlines())}


def test_stages_switch_at_closed_form_steps_and_resume_exactly_inside_and_across(
  tmp_path, tokenizer
):
  """Uninterrupted: stage 1 to its end (step 3), stage 2 to the end (step 6). Interrupted: stopped
  inside stage 1 (step 2), at the boundary (3) and inside stage 2 (5), each part a fresh run
  resuming from the checkpoint on its stage's mesh. The losses are bitwise equal."""
  plan, runs = _plan_run(tmp_path / "a", tokenizer)
  straight = tmp_path / "a.jsonl"
  train_run(runs[0], tokenizer, metrics=MetricsOutputs(jsonl=str(straight)), until=plan.end_step(0))
  train_run(runs[1], tokenizer, metrics=MetricsOutputs(jsonl=str(straight)), until=plan.end_step(1))
  expected = _records(straight)
  assert [expected[s]["batch_shape"] for s in range(1, 7)] == [[8, 32]] * 3 + [[4, 64]] * 3
  assert {r["batch_shape"][0] * r["batch_shape"][1] for r in expected.values()} == {256}

  plan, runs = _plan_run(tmp_path / "b", tokenizer)
  parts = tmp_path / "b.jsonl"
  for stage, until in ((0, 2), (0, 3), (1, 5), (1, 6)):
    train_run(runs[stage], tokenizer, metrics=MetricsOutputs(jsonl=str(parts)), until=until)
  got = _records(parts)
  assert sorted(got) == list(range(1, 7))
  assert [got[s]["loss"] for s in range(1, 7)] == [expected[s]["loss"] for s in range(1, 7)]
  assert expected[6]["loss"] < expected[1]["loss"]


def test_bad_stage_and_evaluation_settings_are_named_before_training(tmp_path, tokenizer):
  with pytest.raises(ValueError, match=r"long-context stage 2.*needs a multiple of 8"):
    _plan_run(tmp_path, tokenizer, stage_meshes=("fsdp=8", "fsdp=8"))
  with pytest.raises(
    ValueError, match=r"seq_len=30 \(short-context rows in long-context stage 1\)"
  ):
    _plan_run(tmp_path, tokenizer, stage_meshes=("fsdp=4,context=2",) * 2, short_seq_len=30)
  with pytest.raises(ValueError, match=r"Needle depth must be in \[0, 100\] percent, got 150"):
    _plan_run(tmp_path, tokenizer, depths=(150.0,), needles=(1,))
  with pytest.raises(ValueError, match="A prompt of 32 tokens cannot hold 4 needles"):
    _plan_run(tmp_path, tokenizer, needles=(4,))
  with pytest.raises(ValueError, match="tokens_per_step must be a positive int, got 0"):
    LongContextConfig((LongContextStage(1024, 8192),), 0)


def test_passkey_documents_fit_the_shortest_row_of_a_ramp(tokenizer):
  plan = LongContextConfig((LongContextStage(128, 3072), LongContextStage(512, 2048)), 1024)
  data = plan.data_config(DataConfig(sources=(DataSource("passkey", "passkey"),)))
  pipeline = make_pipeline(data, tokenizer)
  shapes = []
  for _ in range(5):
    batch = next(pipeline)
    shapes.append(batch["tokens"].shape)
    assert (batch["positions"][:, 0] == 0).all()  # every row starts a document: none is cut
  assert shapes == [(8, 129)] * 3 + [(2, 513)] * 2


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def test_two_stages_through_the_binary_report_each_stage_and_resume(tmp_path):
  """tiny, 512 tokens per step: 4 x 128 then 2 x 256 with context=2; each stage's line gives the
  short-context loss and NIAH; a re-run trains and evaluates nothing again."""
  command = [
    sys.executable,
    os.path.join(REPO, "experiments", "long_context.py"),
    "--config=tiny",
    "--tokens_per_step=512",
    "--stage=128:1024",
    "--stage=256:1024@fsdp=2,context=2",
    "--mesh=fsdp=4",
    "--data=embedded:packages@0.5:whole",
    "--data=passkey@0.5",
    f"--checkpoint_dir={tmp_path / 'run'}",
    f"--output_dir={tmp_path / 'eval'}",
    "--depths=0,100",
    "--niah_samples=1",
    "--eval_every=0",
  ]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
  }
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [line for line in done.stdout.splitlines() if line.startswith("stage ")]
  assert len(lines) == 2, done.stdout
  assert lines[0].startswith("stage 1/2 (128 tokens x 4 rows, step 2")
  assert lines[1].startswith("stage 2/2 (256 tokens x 2 rows, step 4")
  assert "'context': 2" in lines[1] and "short-context loss" in lines[1] and "NIAH" in lines[1]
  stages = [json.loads(x) for x in open(tmp_path / "eval" / "stages.jsonl")]
  assert [s["step"] for s in stages] == [2, 4]
  assert set(stages[1]["niah"]["1"]) == {"128", "256"}
  results = [json.loads(x) for x in open(tmp_path / "eval" / "results.jsonl")]
  assert [(r["stage"], r["length"], r["depth"]) for r in results] == [
    (0, 128, 0.0),
    (0, 128, 100.0),
    (1, 128, 0.0),
    (1, 128, 100.0),
    (1, 256, 0.0),
    (1, 256, 100.0),
  ]
  assert all(0.0 <= r["score"] <= 1.0 for r in results)
  width, height = _png_size(tmp_path / "eval" / "heatmap.png")
  assert width > 200 and height > 100
  again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already trained and evaluated" in again.stderr and "stage " not in again.stdout


def test_a_run_saved_before_whole_documents_existed_still_resumes(tmp_path, tokenizer):
  """The stored data settings of a checkpoint written before DataSource.whole_documents (no such
  key) compare equal to today's run once filled with the defaults."""
  from llama3_jax.train.loop import _canonical

  _, runs = _plan_run(tmp_path, tokenizer)
  current = json.loads(json.dumps(runs[0].to_dict()))
  stored = json.loads(json.dumps(current))
  old_source = stored["data"]["sources"][1]
  assert old_source["whole_documents"] is False
  del old_source["whole_documents"]  # as a checkpoint of the older code stored it
  assert stored["data"] != current["data"]
  assert json.loads(json.dumps(_canonical(stored)))["data"] == current["data"]
