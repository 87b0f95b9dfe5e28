"""Evaluates a checkpoint (or a preset with random weights) on lm-evaluation-harness tasks with the
`llama3_jax` model (llama3_jax/eval/harness.py): the harness's tasks, or local ones (--include_path,
e.g. the shipped experiments/lm_eval_tasks), batched and on a mesh.

  python experiments/evaluate.py --checkpoint /ckpt/Llama3.1-8B --tasks hellaswag,arc_easy \\
      --mesh tensor=8 --output /runs/eval.json
  python experiments/evaluate.py --config tiny --include_path experiments/lm_eval_tasks \\
      --tasks llama3_jax_mc,llama3_jax_gen
"""

import json
import os

import cli
from absl import flags

cli.define("checkpoint", "preset", "model", "mesh", "output")
FLAGS = flags.FLAGS
_TASKS = flags.DEFINE_list("tasks", None, "lm-eval task names, comma-separated.", required=True)
_INCLUDE = flags.DEFINE_string("include_path", None, "A directory of local task YAML files.")
_BATCH = flags.DEFINE_integer("eval_batch_size", 8, "Rows per forward pass.")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many examples per task.")
_SHOTS = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")


def main(argv):
  del argv
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  from llama3_jax.eval.harness import Llama3JaxLM

  model = Llama3JaxLM(
    checkpoint=FLAGS.checkpoint,
    config=FLAGS.config,
    seed=FLAGS.seed,
    batch_size=_BATCH.value,
    mesh=FLAGS.mesh,
    dtype=FLAGS.dtype,
  )
  if _INCLUDE.value and not os.path.isdir(_INCLUDE.value):
    raise FileNotFoundError(f"--include_path {_INCLUDE.value} is not a directory")
  results = simple_evaluate(
    model=model,
    tasks=_TASKS.value,
    task_manager=TaskManager(include_path=_INCLUDE.value),
    limit=_LIMIT.value,
    num_fewshot=_SHOTS.value,
  )
  if results is None:
    return
  for task, metrics in results["results"].items():
    shown = ", ".join(
      f"{name.split(',')[0]} {value:.4f}"
      for name, value in metrics.items()
      if isinstance(value, float) and "stderr" not in name
    )
    print(f"{task}: {shown}")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(
        {"results": results["results"], "config": results.get("config")}, f, indent=2, default=str
      )


if __name__ == "__main__":
  cli.run(main)
