"""lm-evaluation-harness: our `llama3_jax` model (on our Orbax checkpoint, on a tensor-parallel mesh)
and the harness's own `hf` model (on our Hugging Face export of the same weights) give the same
per-example log-likelihoods (1e-4), rolling log-likelihoods, generations and accuracies on the
shipped local tasks (multiple choice, perplexity, generation); the harness's command line and
experiments/evaluate.py run our model."""

import json
import os
import subprocess
import sys

import jax
import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

import llama3_jax as l3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(REPO, "experiments", "lm_eval_tasks")
TASKS = ["llama3_jax_mc", "llama3_jax_ppl", "llama3_jax_gen"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  cfg = l3.get_config("tiny", n_layers=2, max_seq_len=16384)
  params = l3.init_params(cfg, jax.random.key(5))
  root = tmp_path_factory.mktemp("lm_eval")
  l3.save_orbax(str(root / "ours"), cfg, params)
  l3.save_hf(str(root / "hf"), cfg, params)
  return str(root / "ours"), str(root / "hf")


def _evaluate(model, model_args, **kwargs):
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  return simple_evaluate(
    model=model,
    model_args=model_args,
    tasks=TASKS,
    task_manager=TaskManager(include_path=TASKS_DIR),
    log_samples=True,
    batch_size=4,
    **kwargs,
  )


def _responses(results, task):
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def both(checkpoints, monkeypatch_module):
  monkeypatch_module.chdir(REPO)  # the tasks name their data files from the repository root
  import llama3_jax.eval.harness  # noqa: F401  registers llama3_jax

  ours = _evaluate("llama3_jax", f"checkpoint={checkpoints[0]},mesh=tensor=2")
  hf = _evaluate("hf", f"pretrained={checkpoints[1]},dtype=float32", device="cpu")
  return ours, hf


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


def test_multiple_choice_log_likelihoods_and_accuracies_are_the_harness_hf_models(both):
  ours, hf = both
  mine, theirs = _responses(ours, "llama3_jax_mc"), _responses(hf, "llama3_jax_mc")
  assert len(mine) == len(theirs) == 8
  for doc_mine, doc_theirs in zip(mine, theirs):
    assert len(doc_mine) == 4  # a log-likelihood per choice
    for [(logp, greedy)], [(logp_hf, greedy_hf)] in zip(doc_mine, doc_theirs):
      assert logp == pytest.approx(logp_hf, abs=1e-4) and greedy == greedy_hf
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["llama3_jax_mc"][metric] == hf["results"]["llama3_jax_mc"][metric]


def test_rolling_log_likelihoods_and_generations_are_the_harness_hf_models(both):
  ours, hf = both
  for [[mine]], [[theirs]] in zip(*(_responses(r, "llama3_jax_ppl") for r in both)):
    assert mine == pytest.approx(theirs, abs=1e-4 * max(1.0, abs(theirs) / 100))
  mine, theirs = _responses(ours, "llama3_jax_gen"), _responses(hf, "llama3_jax_gen")
  assert mine == theirs and len(mine) == 6
  assert (
    ours["results"]["llama3_jax_gen"]["exact_match,none"]
    == (hf["results"]["llama3_jax_gen"]["exact_match,none"])
  )


def _run(*command):
  """Runs `command` (after the interpreter) from the repository root; its CompletedProcess."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "XLA_FLAGS": ""}
  done = subprocess.run(
    [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_the_harness_command_line_and_evaluate_py_run_our_model(checkpoints, tmp_path):
  output = tmp_path / "eval.json"
  tasks = ["--tasks=llama3_jax_mc", f"--include_path={TASKS_DIR}"]
  harness = _run(
    "-m",
    "llama3_jax.eval.harness",
    "--model=llama3_jax",
    f"--model_args=checkpoint={checkpoints[0]}",
    "--batch_size=4",
    *tasks,
  )
  assert "llama3_jax_mc" in harness.stdout and "acc" in harness.stdout
  evaluate = _run(
    os.path.join(REPO, "experiments", "evaluate.py"),
    f"--checkpoint={checkpoints[0]}",
    *tasks,
    f"--output={output}",
  )
  assert "llama3_jax_mc: acc " in evaluate.stdout
  with open(output) as f:
    assert 0 <= json.load(f)["results"]["llama3_jax_mc"]["acc,none"] <= 1
