"""The flag vocabulary of the binaries in experiments/: one name, one meaning and one default per
flag, in groups a binary defines when it imports them (`cli.define("model", "mesh", ...)`), each
group's flags shown by that binary's `--help`; and the configs built from them (jobs.py runs
the jobs several binaries share).

The README's flag table is `flag_table()` (a test checks it). Every binary starts with `run(main)`.
"""

import ctypes
import os
import sys
from typing import Dict, Optional, Tuple

import jax
from absl import app, flags, logging

import llama3_jax as l3
from llama3_jax.config import (
  CheckpointConfig,
  DataConfig,
  DataSource,
  MeshConfig,
  ModelConfig,
  OptimizerConfig,
  RunConfig,
  TrainConfig,
  parse_ramp,
)
from llama3_jax.config.model_config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES
from llama3_jax.convert import checkpoint_or_preset, save_hf, save_orbax
from llama3_jax.inference.quantize import quantize_params
from llama3_jax.train.checkpointing import CheckpointSaveError
from llama3_jax.train.curves import plot_curves
from llama3_jax.train.fit import FitPolicy
from llama3_jax.train.metrics import MetricsOutputs, read_records

FLAGS = flags.FLAGS

# group -> [(definer, name, default, help, extra keyword arguments)]
_GROUPS = {
  "checkpoint": [
    (
      flags.DEFINE_string,
      "checkpoint",
      None,
      "Model weights to read: Meta consolidated, Hugging Face, ours, or a training run's "
      "directory (its newest step) or one of its steps.",
      {},
    ),
  ],
  "preset": [
    (
      flags.DEFINE_string,
      "config",
      "tiny",
      "Model preset; random weights without --checkpoint.",
      {},
    ),
  ],
  "model": [
    (
      flags.DEFINE_enum,
      "attention_impl",
      None,
      "Attention implementation (default: the model's, 'auto').",
      {"enum_values": list(ATTENTION_IMPLS)},
    ),
    (
      flags.DEFINE_enum,
      "dtype",
      None,
      "Compute dtype (default: the model's; parameters keep theirs).",
      {"enum_values": list(DTYPES)},
    ),
    (flags.DEFINE_integer, "seed", 0, "Random weights, data split and order, sampling.", {}),
  ],
  "tiles": [
    (
      flags.DEFINE_integer,
      "attention_block",
      None,
      "Query and key tile of the block-wise attention kernels, in tokens (default: the model's).",
      {},
    ),
  ],
  "mesh": [
    (
      flags.DEFINE_string,
      "mesh",
      "",
      "Parallelism degrees, e.g. 'fsdp=4,tensor=2' (default: fsdp over every device).",
      {},
    ),
  ],
  "batch": [
    (flags.DEFINE_integer, "global_batch_size", 8, "Rows per step, over all processes.", {}),
    (flags.DEFINE_integer, "seq_len", 128, "Tokens per row.", {}),
  ],
  "steps": [
    (flags.DEFINE_integer, "steps", 150, "Train up to this step (batches trained on).", {}),
  ],
  "ramp": [
    (
      flags.DEFINE_string,
      "batch_ramp",
      "",
      "Batch-size / sequence-length ramp: START_TOKENS:ROWSxSEQ_LEN,... e.g. the paper's "
      "'252e6:1024x8192,2.87e12:2048x8192' after --global_batch_size=1024 --seq_len=4096.",
      {},
    ),
  ],
  "rows": [
    (
      flags.DEFINE_enum,
      "on_bad_row",
      "skip",
      "A data row that cannot be read or parsed: skip it (logged with file:line, counted) or fail.",
      {"enum_values": ["skip", "fail"]},
    ),
  ],
  "training": [
    (
      flags.DEFINE_multi_string,
      "data",
      [],
      "Data, repeatable: PATTERN[@WEIGHT][:whole] (pretraining mixes the sources by weight; "
      ":whole keeps documents that fit in a row uncut); also passkey (synthetic retrieval "
      "documents), embedded:stdlib and embedded:packages (long documents).",
      {},
    ),
    (flags.DEFINE_float, "held_out_fraction", 0.01, "Share of rows kept out for eval.", {}),
    (flags.DEFINE_float, "lr", 3e-4, "Peak learning rate.", {}),
    (flags.DEFINE_integer, "warmup_steps", None, "Default: min(8000, steps // 10).", {}),
    (flags.DEFINE_integer, "decay_steps", None, "Cosine decay length; default: steps.", {}),
    (flags.DEFINE_integer, "anneal_steps", 0, "Final linear anneal to 0 over this many steps.", {}),
    (flags.DEFINE_float, "adam_eps", OptimizerConfig.eps, "AdamW's epsilon.", {}),
    (flags.DEFINE_float, "weight_decay", OptimizerConfig.weight_decay, "AdamW's weight decay.", {}),
    (
      flags.DEFINE_float,
      "clip_norm",
      OptimizerConfig.clip_norm,
      "Gradients clipped to this global norm (0: not clipped).",
      {},
    ),
    (flags.DEFINE_integer, "eval_every", 50, "Held-out metrics every N steps (0: never).", {}),
    (flags.DEFINE_integer, "log_every", 10, "Progress line every N steps.", {}),
    (
      flags.DEFINE_string,
      "checkpoint_dir",
      None,
      "Save the train state here every --save_every steps; a re-run resumes from here.",
      {},
    ),
    (flags.DEFINE_integer, "save_every", 100, "Checkpoint every N steps.", {}),
    (flags.DEFINE_integer, "keep_checkpoints", 3, "Newest checkpoints kept.", {}),
    (
      flags.DEFINE_bool,
      "allow_data_change",
      False,
      "Let a resume change the data (sources, seed, row length, batch, split): the data then "
      "start afresh. Without it such a resume is refused.",
      {},
    ),
    (
      flags.DEFINE_string,
      "metrics_file",
      None,
      "Step metrics as JSON lines, one record per step across resumes (default: "
      "CHECKPOINT_DIR/metrics.jsonl; '': none).",
      {},
    ),
    (
      flags.DEFINE_string,
      "tensorboard_dir",
      None,
      "TensorBoard event files of the step metrics (default: CHECKPOINT_DIR/tensorboard; '': none).",
      {},
    ),
    (
      flags.DEFINE_string,
      "wandb_project",
      None,
      "Also log the step metrics to this Weights & Biases project (pip install "
      "'llama3_jax[wandb]'); the run is named after --checkpoint_dir, so a resume logs into it.",
      {},
    ),
    (
      flags.DEFINE_string,
      "plot_file",
      None,
      "At the end, draw the loss, learning-rate and throughput curves of the run here (PNG; "
      "default: CHECKPOINT_DIR/metrics.png; '': none).",
      {},
    ),
  ],
  "memory": [
    (
      flags.DEFINE_enum,
      "remat",
      None,
      "Rematerialisation policy (default: the model's).",
      {"enum_values": list(REMAT_POLICIES)},
    ),
    (
      flags.DEFINE_integer,
      "loss_chunk",
      1024,
      "Tokens per row per output-head/loss chunk (0: all at once).",
      {},
    ),
  ],
  "schedule": [
    (flags.DEFINE_integer, "micro_batches", 1, "Gradient accumulation micro-batches.", {}),
    (
      flags.DEFINE_integer,
      "pipeline_micro_batches",
      0,
      "Micro-batches in flight through the pipeline stages (0: one per stage).",
      {},
    ),
    (
      flags.DEFINE_integer,
      "pipeline_interleave",
      1,
      "Virtual pipeline stages per device (>1: the interleaved schedule).",
      {},
    ),
  ],
  "generation": [
    (flags.DEFINE_integer, "max_new_tokens", 32, "Tokens to generate per prompt at most.", {}),
  ],
  "sampling": [
    (flags.DEFINE_float, "temperature", 0.6, "Sampling temperature (0: greedy).", {}),
    (flags.DEFINE_integer, "top_k", 0, "Keep the k most likely tokens (0: all).", {}),
    (flags.DEFINE_float, "top_p", 0.9, "Nucleus sampling mass.", {}),
  ],
  "pretraining": [
    (
      flags.DEFINE_enum,
      "data_kind",
      "auto",
      "Kind of every --data source; auto: by extension (.jsonl, .array_record, else text files, "
      'one document each). chat: JSONL dialogs {"messages": [...]}, the loss on the assistant\'s '
      "tokens only (SFT). No --data: the embedded standard-library corpus.",
      {"enum_values": ["auto", "text", "jsonl", "array_record", "chat"]},
    ),
    (flags.DEFINE_string, "data_field", "text", "JSON field holding the text.", {}),
    (flags.DEFINE_float, "z_loss", 0.0, "z-loss weight.", {}),
    (
      flags.DEFINE_float,
      "peak_tflops_per_device",
      0.0,
      "Peak bf16 TFLOP/s of one device, for MFU (e.g. 989 for H100).",
      {},
    ),
    (
      flags.DEFINE_string,
      "sample_prompt",
      "def fibonacci(n):",
      "Continued at the end (see --sample_temperature).",
      {},
    ),
    (
      flags.DEFINE_float,
      "sample_temperature",
      0.7,
      "Temperature of that continuation, top-p 0.9, seeded by --seed (0: greedy).",
      {},
    ),
  ],
  "distributed": [
    (
      flags.DEFINE_string,
      "coordinator_address",
      None,
      "host:port of process 0 of a multi-process job (with --num_processes, --process_id).",
      {},
    ),
    (flags.DEFINE_integer, "num_processes", None, "Processes in the job.", {}),
    (flags.DEFINE_integer, "process_id", None, "This process's index.", {}),
    (
      flags.DEFINE_bool,
      "multihost",
      False,
      "Join the job JAX finds in the environment (Cloud TPU pod slices).",
      {},
    ),
  ],
  "lengths": [
    (
      flags.DEFINE_string,
      "lengths",
      "512,1024",
      "Context lengths in tokens, comma-separated (NIAH: prompt and answer; benchmarks: rows).",
      {},
    ),
  ],
  "niah": [
    (
      flags.DEFINE_string,
      "depths",
      "0,25,50,75,100",
      "Needle depths, percent of the haystack.",
      {},
    ),
    (
      flags.DEFINE_string,
      "needles",
      "1",
      "Needles per prompt, comma-separated counts: 1 (single needle) or more (multi-needle, 2 of "
      "them asked; the paper's is 4).",
      {},
    ),
    (
      flags.DEFINE_integer,
      "niah_samples",
      4,
      "Prompts per length x depth, each with its own keys.",
      {},
    ),
    (
      flags.DEFINE_string,
      "haystack",
      "passkey",
      "Filler text: passkey (the pass-key test's sentences), embedded (the standard library's "
      "sources) or a glob of text files.",
      {},
    ),
    (flags.DEFINE_integer, "niah_batch_size", 4, "Prompts answered at a time.", {}),
    (
      flags.DEFINE_string,
      "output_dir",
      None,
      "Write results.jsonl (a record per length x depth) and heatmap.png here.",
      {},
    ),
  ],
  "output": [
    (flags.DEFINE_string, "output", None, "Write the result here.", {}),
  ],
  "format": [
    (
      flags.DEFINE_enum,
      "to",
      None,
      "Checkpoint format to write at --output: hf (safetensors; fp8 models in fbgemm_fp8, as "
      "Meta's FP8 release) or orbax (ours).",
      {"enum_values": ["hf", "orbax"]},
    ),
  ],
  "quantize": [
    (
      flags.DEFINE_enum,
      "quantize",
      None,
      "Quantize the model after loading. fp8: the paper's serving quantization, the "
      "feed-forward weights of every layer but the first and last in e4m3 with row-wise scales.",
      {"enum_values": ["fp8"]},
    ),
  ],
  "reward_model": [
    (
      flags.DEFINE_string,
      "reward_model",
      None,
      "A reward model: reward.py's --output, its --checkpoint_dir (newest step) or one step of it.",
      {},
    ),
  ],
}


def define(*groups: str) -> None:
  """Defines the flags of `groups` (keys of the vocabulary) as key flags of the calling binary:
  its `--help` lists them. Call once, at import."""
  caller = sys._getframe(1).f_globals["__name__"]
  caller = sys.argv[0] if caller == "__main__" else caller
  for group in groups:
    for definer, name, default, help_text, extra in _GROUPS[group]:
      definer(name=name, default=default, help=help_text, **extra)
      FLAGS.register_key_flag_for_module(caller, FLAGS[name])


def flag_table() -> str:
  """The vocabulary as a Markdown table (group, flag, default, meaning), as in the README."""
  lines = ["| group | flag | default | meaning |", "| --- | --- | --- | --- |"]
  for group, entries in _GROUPS.items():
    for _, name, default, help_text, _ in entries:
      shown = "" if default in (None, [], "") else f"`{default}`"
      lines.append(f"| {group} | `--{name}` | {shown} | {help_text} |")
  return "\n".join(lines)


def mesh_config() -> MeshConfig:
  return MeshConfig.parse(FLAGS.mesh)


_MODEL_FIELDS = {
  "attention_impl": ("attention_impl",),
  "attention_block": ("attention_block_q", "attention_block_kv"),
  "dtype": ("dtype",),
  "remat": ("remat_policy",),
}


def model_overrides(*names: str) -> Dict:
  """{ModelConfig field: value} of the model-field flags among `names` that were given."""
  return {
    field: FLAGS[name].value
    for name in names
    if FLAGS[name].value is not None
    for field in _MODEL_FIELDS[name]
  }


def load_model(mesh=None, **overrides) -> Tuple[ModelConfig, Dict]:
  """(config, params) of --checkpoint, or of --config randomly initialised with --seed, with
  --attention_impl and --dtype when given and `overrides`; placed in their shards on `mesh` when
  given."""
  overrides = {**model_overrides("attention_impl", "dtype"), **overrides}
  return checkpoint_or_preset(FLAGS.checkpoint, FLAGS.config, FLAGS.seed, mesh, **overrides)


def quantized(cfg: ModelConfig, params: Dict, mesh=None) -> Tuple[ModelConfig, Dict]:
  """The model quantized as --quantize asks (placed on `mesh` when given), or as it is."""
  if FLAGS.quantize is None:
    return cfg, params
  return quantize_params(cfg, params, mesh)


def save_model(cfg: ModelConfig, params: Dict) -> None:
  """Writes the model at --output (a new or empty directory) in the --to format."""
  if FLAGS.to == "hf":
    save_hf(FLAGS.output, cfg, params)
  else:
    save_orbax(FLAGS.output, cfg, params)
  logging.info(
    "Wrote %s (%s) in %s format to %s", cfg.name, cfg.param_dtype, FLAGS.to, FLAGS.output
  )


def check_output_is_new() -> None:
  """A usage error, before any work, when --output exists and is not an empty directory."""
  output = FLAGS.output
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise app.UsageError(f"--output {output} exists and is not an empty directory")


def sampling_config() -> "l3.SamplingConfig":
  return l3.SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)


def optimizer_config(steps: Optional[int] = None) -> OptimizerConfig:
  """AdamW from --lr, --warmup_steps, --decay_steps, --anneal_steps over `steps` (default
  --steps), --adam_eps, --weight_decay and --clip_norm."""
  steps = FLAGS.steps if steps is None else steps
  warmup = FLAGS.warmup_steps if FLAGS.warmup_steps is not None else min(8000, steps // 10)
  return OptimizerConfig(
    peak_lr=FLAGS.lr,
    warmup_steps=warmup,
    decay_steps=FLAGS.decay_steps or max(steps, warmup + 1),
    anneal_steps=FLAGS.anneal_steps,
    eps=FLAGS.adam_eps,
    weight_decay=FLAGS.weight_decay,
    clip_norm=FLAGS.clip_norm,
  )


def checkpoint_config() -> CheckpointConfig:
  return CheckpointConfig(
    FLAGS.checkpoint_dir,
    FLAGS.save_every,
    FLAGS.keep_checkpoints,
    allow_data_change=FLAGS.allow_data_change,
  )


def metrics_outputs() -> MetricsOutputs:
  """--metrics_file, --tensorboard_dir and --wandb_project, with their defaults in
  --checkpoint_dir."""
  return MetricsOutputs.beside(
    FLAGS.checkpoint_dir,
    jsonl=FLAGS.metrics_file,
    tensorboard_dir=FLAGS.tensorboard_dir,
    wandb_project=FLAGS.wandb_project,
  )


def plot_run(records) -> None:
  """Draws the run's curves at --plot_file (default: CHECKPOINT_DIR/metrics.png): of every step
  in its metrics file when it has one, else of `records` (this session's)."""
  path = FLAGS.plot_file
  if path is None and FLAGS.checkpoint_dir:
    path = os.path.join(FLAGS.checkpoint_dir, "metrics.png")
  if not path or jax.process_index() > 0:
    return
  jsonl = metrics_outputs().jsonl
  if jsonl and os.path.exists(jsonl):
    records = read_records(jsonl)
  plot_curves({os.path.basename(os.path.abspath(FLAGS.checkpoint_dir or ".")): records}, path)
  logging.info("Wrote the run's curves to %s", path)


def fit_policy(eval_at_start: bool) -> FitPolicy:
  return FitPolicy(
    steps=FLAGS.steps,
    eval_every=FLAGS.eval_every,
    eval_at_start=eval_at_start,
    log_every=FLAGS.log_every,
    allow_data_change=FLAGS.allow_data_change,
  )


def required(*names: str) -> None:
  """Marks flags of the vocabulary as required by this binary."""
  for name in names:
    flags.mark_flag_as_required(name)


# --- The pretraining run (pretrain.py, sft.py).

PRETRAINING_GROUPS = (
  "checkpoint",
  "rows",
  "preset",
  "model",
  "tiles",
  "mesh",
  "batch",
  "steps",
  "ramp",
  "training",
  "memory",
  "schedule",
  "pretraining",
  "distributed",
  "generation",
)

_KINDS = {".jsonl": "jsonl", ".array_record": "array_record", ".arrayrecord": "array_record"}


WHOLE_SUFFIX = ":whole"


def data_sources() -> Tuple[DataSource, ...]:
  """--data PATTERN[@WEIGHT][:whole] entries of --data_kind (auto: `passkey` the synthetic
  retrieval documents, `embedded:stdlib` / `embedded:packages` the embedded corpora, else by
  extension) reading --data_field; `:whole` keeps the source's documents whole in rows."""
  sources = []
  for spec in FLAGS.data:
    whole = spec.endswith(WHOLE_SUFFIX)
    pattern, _, weight = spec.removesuffix(WHOLE_SUFFIX).partition("@")
    kind = FLAGS.data_kind
    if kind == "auto":
      kind = "passkey" if pattern == "passkey" else _KINDS.get(os.path.splitext(pattern)[1], "text")
    field = FLAGS.data_field if kind in _KINDS.values() else "text"
    try:
      weight = float(weight or 1.0)
    except ValueError:
      raise ValueError(f"--data {spec!r}: the weight after @ must be a number") from None
    sources.append(DataSource(pattern, kind, weight, field, whole_documents=whole))
  return tuple(sources)


def data_config(global_batch_size: int, seq_len: int, ramp=()) -> DataConfig:
  """The --data sources (see `data_sources`), split, seed and bad-row policy, in batches of
  `global_batch_size` rows of `seq_len` tokens, then the `ramp`'s."""
  return DataConfig(
    sources=data_sources(),
    seq_len=seq_len,
    global_batch_size=global_batch_size,
    seed=FLAGS.seed,
    held_out_fraction=FLAGS.held_out_fraction,
    ramp=ramp,
    skip_malformed=FLAGS.on_bad_row == "skip",
  )


def run_config(
  model_cfg: ModelConfig, *, steps: Optional[int] = None, data: Optional[DataConfig] = None
) -> RunConfig:
  """The pretraining run the flags describe, for `model_cfg` with --attention_impl / --remat,
  of `steps` (default --steps) on `data` (default: --global_batch_size, --seq_len, --batch_ramp)."""
  steps = FLAGS.steps if steps is None else steps
  if data is None:
    data = data_config(FLAGS.global_batch_size, FLAGS.seq_len, parse_ramp(FLAGS.batch_ramp))
  return RunConfig(
    model=model_cfg.replace(
      **model_overrides("attention_impl", "attention_block", "dtype", "remat")
    ),
    mesh=mesh_config(),
    optimizer=optimizer_config(steps),
    data=data,
    train=TrainConfig(
      steps=steps,
      micro_batches=FLAGS.micro_batches,
      pipeline_micro_batches=FLAGS.pipeline_micro_batches,
      pipeline_interleave=FLAGS.pipeline_interleave,
      z_loss_weight=FLAGS.z_loss,
      log_every=FLAGS.log_every,
      eval_every=FLAGS.eval_every,
      peak_tflops_per_device=FLAGS.peak_tflops_per_device,
      loss_chunk=FLAGS.loss_chunk,
    ),
    checkpoint=checkpoint_config(),
  )


# A user's mistake (a bad flag value, config, path, file or checkpoint) ends a binary with one line
# and this status; a failed save with one line and status 1; anything else with its traceback.
USAGE_EXIT = 2
USER_ERRORS = (ValueError, OSError, app.UsageError)


def _fail(message: str, status: int, at_once: bool = False) -> None:
  """Prints `<binary>: error: <message>` and exits with `status`; `at_once` skips the interpreter's
  shutdown (after a failed save, Orbax's writer threads and event loop would print their own
  errors after this line)."""
  program = os.path.basename(sys.argv[0]) if sys.argv else "llama3_jax"
  print(f"{program}: error: {' '.join(message.split())}", file=sys.stderr)
  if at_once:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (see --help)", USAGE_EXIT)


M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2


def _bound_malloc_arenas() -> None:
  """Caps glibc's malloc arenas (one per thread by default: grain, Orbax and TensorStore threads
  each keep freed host buffers, e.g. a save's copy of the state, so resident memory climbs for a
  long while; experiments/soak.py measures it) unless MALLOC_ARENA_MAX is set. Off glibc: nothing."""
  if "MALLOC_ARENA_MAX" in os.environ:
    return
  try:
    ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)
  except (OSError, AttributeError):
    pass


def run(main) -> None:
  """`app.run(main)`, with a bad flag or a user error (USER_ERRORS) raised by `main` printed as
  one line `<binary>: error: <message>` and exit status 2 (the traceback is logged at
  --verbosity=1), and a CheckpointSaveError as one line with status 1; malloc arenas bounded."""
  _bound_malloc_arenas()

  def guarded(argv):
    try:
      return main(argv)
    except (CheckpointSaveError, *USER_ERRORS) as e:
      if isinstance(e, (TimeoutError, ConnectionError)):  # the job's, not the user's: traceback
        raise
      logging.vlog(1, "Traceback of the error below", exc_info=True)
      failed_save = isinstance(e, CheckpointSaveError)
      _fail(str(e) or type(e).__name__, 1 if failed_save else USAGE_EXIT, at_once=failed_save)

  app.run(guarded, flags_parser=_parse_flags)
