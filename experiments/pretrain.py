"""Pretrains a Llama 3 preset on a mesh of data / FSDP / pipeline / context / tensor parallelism;
re-running resumes.

  python experiments/pretrain.py --config tiny --steps 150 --checkpoint_dir /tmp/tiny_run
  python experiments/pretrain.py --config llama3.1-8b --mesh fsdp=64,tensor=8 \
      --data 'gs://bucket/web/*.jsonl@0.5' --data 'gs://bucket/code/*.jsonl@0.17' ...
"""

import os

import jax
from absl import app, flags, logging

import llama3_jax as l3
from llama3_jax.config import (
  CheckpointConfig,
  DataConfig,
  DataSource,
  MeshConfig,
  OptimizerConfig,
  RunConfig,
  TrainConfig,
  parse_ramp,
)
from llama3_jax.config.model_config import ATTENTION_IMPLS, REMAT_POLICIES
from llama3_jax.convert import load_checkpoint
from llama3_jax.parallel import initialize
from llama3_jax.train.loop import train

_CONFIG = flags.DEFINE_string("config", "tiny", "Model preset.")
_STEPS = flags.DEFINE_integer("steps", 150, "Train up to this step.")
_MESH = flags.DEFINE_string(
  "mesh", "", "Parallelism degrees, e.g. 'fsdp=4,tensor=2' (default: fsdp over all)."
)
_BATCH = flags.DEFINE_integer("global_batch_size", 8, "Rows per step, over all processes.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_RAMP = flags.DEFINE_string(
  "batch_ramp",
  "",
  "Batch-size / sequence-length ramp: START_TOKENS:ROWSxSEQ_LEN,... e.g. the paper's "
  "'252e6:1024x8192,2.87e12:2048x8192' after --global_batch_size=1024 --seq_len=4096.",
)
_DATA = flags.DEFINE_multi_string(
  "data",
  [],
  "Data files: PATTERN[@WEIGHT]; .jsonl and .array_record by extension, else text "
  "files (one document each). Absent: the embedded standard-library corpus.",
)
_DATA_FIELD = flags.DEFINE_string("data_field", "text", "JSON field holding the text.")
_DATA_KIND = flags.DEFINE_enum(
  "data_kind",
  "auto",
  ["auto", "text", "jsonl", "array_record", "chat"],
  'Kind of every --data source; auto: by extension. chat: JSONL dialogs {"messages": [...]}, '
  "the loss on the assistant's tokens only (SFT).",
)
_HELD_OUT = flags.DEFINE_float("held_out_fraction", 0.01, "Documents kept out for eval loss.")
_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "Save here; resume from here.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 50, "Checkpoint every N steps.")
_KEEP = flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
_METRICS_FILE = flags.DEFINE_string("metrics_file", None, "Append JSON lines of step metrics here.")
_INIT = flags.DEFINE_string("init_checkpoint", None, "Start from these weights (Meta, HF or ours).")
_LR = flags.DEFINE_float("lr", 3e-4, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", None, "Default: min(8000, steps // 10).")
_DECAY = flags.DEFINE_integer("decay_steps", None, "Cosine length; default: steps.")
_ANNEAL = flags.DEFINE_integer("anneal_steps", 0, "Final linear anneal to 0 over this many steps.")
_MICRO = flags.DEFINE_integer("micro_batches", 1, "Gradient accumulation micro-batches.")
_PIPELINE_MICRO = flags.DEFINE_integer(
  "pipeline_micro_batches", 0, "Micro-batches in flight through the pipeline stages (0: stages)."
)
_PIPELINE_INTERLEAVE = flags.DEFINE_integer(
  "pipeline_interleave", 1, "Virtual pipeline stages per device (>1: interleaved schedule)."
)
_Z_LOSS = flags.DEFINE_float("z_loss", 0.0, "z-loss weight.")
_ATTENTION = flags.DEFINE_enum(
  "attention_impl", None, list(ATTENTION_IMPLS), "Attention implementation (default: the model's)."
)
_REMAT = flags.DEFINE_enum(
  "remat", None, list(REMAT_POLICIES), "Rematerialisation policy (default: the model's)."
)
_LOSS_CHUNK = flags.DEFINE_integer(
  "loss_chunk", 1024, "Tokens per row per output-head/loss chunk (0: all at once)."
)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out loss every N steps (0: never).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Progress line every N steps.")
_PEAK_TFLOPS = flags.DEFINE_float(
  "peak_tflops_per_device", 0.0, "For MFU (e.g. 989 for H100 bf16)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and data order.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 in a multi-process job (with the two below)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False, "Join the job JAX finds in the environment (Cloud TPU pod slices)."
)
_SAMPLE = flags.DEFINE_string(
  "sample_prompt", "def fibonacci(n):", "Printed continuation at the end."
)
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 32, "Tokens to sample at the end.")

_KINDS = {".jsonl": "jsonl", ".array_record": "array_record", ".arrayrecord": "array_record"}


def _sources():
  sources = []
  for spec in _DATA.value:
    pattern, _, weight = spec.partition("@")
    kind = _DATA_KIND.value
    if kind == "auto":
      kind = _KINDS.get(os.path.splitext(pattern)[1], "text")
    sources.append(
      DataSource(
        pattern,
        kind,
        float(weight or 1.0),
        _DATA_FIELD.value if kind in _KINDS.values() else "text",
      )
    )
  return tuple(sources)


def _run_config(model_cfg) -> RunConfig:
  steps = _STEPS.value
  warmup = _WARMUP.value if _WARMUP.value is not None else min(8000, steps // 10)
  overrides = {"attention_impl": _ATTENTION.value, "remat_policy": _REMAT.value}
  return RunConfig(
    model=model_cfg.replace(**{k: v for k, v in overrides.items() if v}),
    mesh=MeshConfig.parse(_MESH.value),
    optimizer=OptimizerConfig(
      peak_lr=_LR.value,
      warmup_steps=warmup,
      decay_steps=_DECAY.value or max(steps, warmup + 1),
      anneal_steps=_ANNEAL.value,
    ),
    data=DataConfig(
      sources=_sources(),
      seq_len=_SEQ_LEN.value,
      global_batch_size=_BATCH.value,
      seed=_SEED.value,
      held_out_fraction=_HELD_OUT.value,
      ramp=parse_ramp(_RAMP.value),
    ),
    train=TrainConfig(
      steps=steps,
      micro_batches=_MICRO.value,
      pipeline_micro_batches=_PIPELINE_MICRO.value,
      pipeline_interleave=_PIPELINE_INTERLEAVE.value,
      z_loss_weight=_Z_LOSS.value,
      log_every=_LOG_EVERY.value,
      eval_every=_EVAL_EVERY.value,
      peak_tflops_per_device=_PEAK_TFLOPS.value,
      loss_chunk=_LOSS_CHUNK.value,
    ),
    checkpoint=CheckpointConfig(
      directory=_CHECKPOINT_DIR.value, save_every=_SAVE_EVERY.value, keep=_KEEP.value
    ),
  )


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of Orbax and grain; their warnings and errors still show."""

  def filter(self, record):
    return record.levelno > logging.INFO or not any(
      part in record.pathname for part in ("/orbax/", "/grain/")
    )


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # progress is logged by process 0
  tokenizer = l3.Tokenizer.default()
  init_params = None
  if _INIT.value:
    model_cfg, init_params = load_checkpoint(_INIT.value, param_dtype="float32")
  else:
    model_cfg = l3.get_config(_CONFIG.value, param_dtype="float32")
  run = _run_config(model_cfg)
  logging.info("Model %s: %s parameters", model_cfg.name, f"{l3.count_params(model_cfg):,}")
  state = train(run, tokenizer, init_params=init_params, metrics_file=_METRICS_FILE.value)
  if _SAMPLE.value and _SAMPLE_TOKENS.value and jax.process_index() == 0:
    prompt = tokenizer.encode(_SAMPLE.value, bos=True, eos=False)
    [sample] = l3.generate(
      run.model,
      state.params,
      [prompt],
      max_new_tokens=_SAMPLE_TOKENS.value,
      stop_ids=tokenizer.stop_ids,
      sampling=l3.SamplingConfig(temperature=0.0),
    )
    print(f"--- sample after step {int(state.step)}\n{_SAMPLE.value}{tokenizer.decode(sample)}")


if __name__ == "__main__":
  app.run(main)
