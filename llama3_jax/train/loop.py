"""The pretraining loop: resume, step, log, evaluate, checkpoint, and account for where time went."""

import dataclasses
import json
import time
from typing import Dict, Optional

import jax
import numpy as np
from absl import logging

from llama3_jax.config import RunConfig
from llama3_jax.data import MalformedCounter, make_pipeline
from llama3_jax.parallel import (
  batch_degree,
  batch_sharding,
  load_balanced_order,
  make_mesh,
  mesh_context,
)
from llama3_jax.train.checkpointing import RunCheckpointer, StopRequest, check_resumable
from llama3_jax.train.flops import train_flops_per_token
from llama3_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama3_jax.train.train_state import abstract_train_state, create_train_state
from llama3_jax.train.train_step import loss_sums_and_grads, make_train_step, pipeline_schedule


@dataclasses.dataclass
class TimeBreakdown:
  """Wall seconds by activity; goodput is the share spent in training steps. `data` is host time
  spent reading batches, most of it while the devices run the step before."""

  compile: float = 0.0
  data: float = 0.0
  steps: float = 0.0
  evaluation: float = 0.0
  checkpointing: float = 0.0

  def summary(self, total: float) -> str:
    parts = ", ".join(
      f"{name} {seconds:.1f}s" for name, seconds in dataclasses.asdict(self).items()
    )
    return f"{total:.1f}s total: {parts}; goodput {self.steps / max(total, 1e-9):.1%}"


def _format_eta(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _device_batch(batch, sharding):
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


class _Run:
  """One training run's pieces, built once; `loop` drives them."""

  def __init__(
    self, run: RunConfig, tokenizer, init_params: Optional[Dict], metrics_file: Optional[str]
  ):
    self.run, self.tokenizer, self.times = run, tokenizer, TimeBreakdown()
    cfg, train_cfg = run.model, run.train
    self.mesh = make_mesh(run.mesh)
    splits = train_cfg.micro_batches
    if self.mesh.shape["pipeline"] > 1:
      schedule = pipeline_schedule(train_cfg, self.mesh.shape["pipeline"])
      schedule.check(cfg.n_layers, schedule.micro_batches)
      splits *= schedule.micro_batches
      logging.info(
        "Pipeline: %d stages x %d virtual, %d micro-batches, bubble fraction %.3f",
        schedule.stages,
        schedule.interleave,
        schedule.micro_batches,
        schedule.bubble_fraction,
      )
    for stage in run.data.stages:
      load_balanced_order(stage.seq_len, self.mesh.shape["context"])  # raises if it does not split
      if stage.global_batch_size % (batch_degree(self.mesh) * splits):
        raise ValueError(
          f"global_batch_size={stage.global_batch_size} (the stage from token "
          f"{stage.start_tokens}) does not divide into {splits} (pipeline) micro-batches over "
          f"the {batch_degree(self.mesh)} data x fsdp shards of mesh {dict(self.mesh.shape)}"
        )
    tx = make_optimizer(run.optimizer, train_cfg.steps)
    self.malformed = MalformedCounter()
    self.data = make_pipeline(
      run.data,
      tokenizer,
      split="train",
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      counter=self.malformed,
    )
    self.checkpointer = None
    if run.checkpoint.directory:
      self.checkpointer = RunCheckpointer(
        run.checkpoint.directory,
        run.checkpoint.save_every,
        run.checkpoint.keep,
        run.checkpoint.async_save,
      )
    resume_step = self.checkpointer.latest_step() if self.checkpointer else None
    if resume_step is None:
      self.state, shardings = create_train_state(
        cfg, tx, self.mesh, jax.random.key(run.data.seed), params=init_params
      )
    else:
      check_resumable(self.checkpointer.stored_config(resume_step), run.model)
      abstract = abstract_train_state(cfg, tx, self.mesh)
      self.state, _ = self.checkpointer.restore(resume_step, abstract, self.data)
      shardings = jax.tree.map(lambda x: x.sharding, abstract)
    self.data_sharding = batch_sharding(self.mesh)
    self.step_fn = jax.jit(
      make_train_step(cfg, train_cfg, tx, learning_rate_schedule(run.optimizer, train_cfg.steps)),
      in_shardings=(shardings, self.data_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    self.eval_fn = jax.jit(lambda p, b: loss_sums_and_grads(p, b, cfg, train_cfg)[:2])
    self.metrics_file = metrics_file if jax.process_index() == 0 else None

  def _draw(self):
    """(The next batch on the devices, the data position after it)."""
    t = time.perf_counter()
    batch = _device_batch(next(self.data), self.data_sharding)
    position = self.data.get_state()
    self.times.data += time.perf_counter() - t
    return batch, position

  def evaluate(self) -> float:
    """Mean loss per target over up to `eval_batches` held-out batches."""
    eval_data = make_pipeline(
      self.run.data,
      self.tokenizer,
      split="eval",
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    ce_total, count_total = 0.0, 0
    for _, batch in zip(range(self.run.train.eval_batches), eval_data):
      ce_sum, count = self.eval_fn(self.state.params, _device_batch(batch, self.data_sharding))
      ce_total, count_total = ce_total + float(ce_sum), count_total + int(count)
    return ce_total / max(count_total, 1)

  def loop(self, stop: StopRequest, metrics_out) -> None:
    """Steps until `train.steps` or a stop request. The next batch is read while the devices run
    the current step; a checkpoint stores the data position after the last batch trained on."""
    train_cfg, times = self.run.train, self.times
    step = int(self.state.step)
    logging.info(
      "Training from step %d to %d on mesh %s", step, train_cfg.steps, dict(self.mesh.shape)
    )
    compiled_shapes, upcoming = set(), None
    while step < train_cfg.steps and not stop.requested:
      batch, position = upcoming or self._draw()
      rows, row_len = batch["tokens"].shape
      t = time.perf_counter()
      data_before = times.data
      self.state, metrics = self.step_fn(self.state, batch)
      upcoming = self._draw() if step + 1 < train_cfg.steps else None
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - t - (times.data - data_before)
      if (
        rows,
        row_len,
      ) not in compiled_shapes:  # one compile per batch shape (see DataConfig.ramp)
        compiled_shapes.add((rows, row_len))
        times.compile += elapsed
        window = dict(seconds=0.0, steps=0, tokens=0, flops=0.0)
      else:
        times.steps += elapsed
        tokens = rows * (row_len - 1)
        window["seconds"] += elapsed
        window["steps"] += 1
        window["tokens"] += tokens
        window["flops"] += train_flops_per_token(self.run.model, row_len - 1) * tokens
      if int(self.state.nonfinite_streak) >= train_cfg.max_nonfinite_steps:
        raise FloatingPointError(
          f"{train_cfg.max_nonfinite_steps} consecutive steps had a NaN/Inf loss or gradient "
          f"(last loss {metrics['loss']}); stopping at step {step}"
        )
      if metrics["skipped"]:
        logging.warning("Step %d: non-finite loss or gradient, update skipped", step + 1)
        continue
      step += 1
      record = dict(
        step=step,
        loss=float(metrics["loss"]),
        lr=float(metrics["lr"]),
        grad_norm=float(metrics["grad_norm"]),
        tokens=int(metrics["tokens"]),
        batch_shape=[rows, row_len - 1],
      )
      if window["steps"]:
        record.update(
          tokens_per_s=window["tokens"] / window["seconds"],
          tflops_per_s=window["flops"] / window["seconds"] / 1e12,
          eta_s=window["seconds"] / window["steps"] * (train_cfg.steps - step),
        )
        if train_cfg.peak_tflops_per_device:
          record["mfu"] = record["tflops_per_s"] / (
            train_cfg.peak_tflops_per_device * jax.device_count()
          )
      if train_cfg.eval_every and step % train_cfg.eval_every == 0:
        t = time.perf_counter()
        record["eval_loss"] = self.evaluate()
        times.evaluation += time.perf_counter() - t
      if self.malformed.total:
        record["malformed_rows"] = self.malformed.total
      if metrics_out:
        metrics_out.write(json.dumps(record) + "\n")
        metrics_out.flush()
      if step % train_cfg.log_every == 0 or step == train_cfg.steps or "eval_loss" in record:
        _log_progress(record, train_cfg.steps)
      if self.checkpointer and (
        self.checkpointer.should_save(step) or step == train_cfg.steps or stop.requested
      ):
        t = time.perf_counter()
        self.checkpointer.save(
          step, self.state, position, dict(self.run.to_dict(), process_count=jax.process_count())
        )
        times.checkpointing += time.perf_counter() - t


def _log_progress(record: Dict, total_steps: int) -> None:
  line = (
    f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
    f"grad {record['grad_norm']:.3f}"
  )
  if "eval_loss" in record:
    line += f" | eval {record['eval_loss']:.4f}"
  if "tokens_per_s" in record:
    line += f" | {record['tokens_per_s']:,.0f} tok/s | {record['tflops_per_s']:.3f} TFLOP/s"
    if "mfu" in record:
      line += f" | MFU {record['mfu']:.1%}"
    line += f" | ETA {_format_eta(record['eta_s'])}"
  logging.info("%s", line)


def train(
  run: RunConfig,
  tokenizer,
  *,
  init_params: Optional[Dict] = None,
  metrics_file: Optional[str] = None,
):
  """Trains up to `run.train.steps`, resuming from the newest checkpoint in
  `run.checkpoint.directory` if there is one. Returns the final TrainState."""
  started = time.perf_counter()
  job = _Run(run, tokenizer, init_params, metrics_file)
  stop = StopRequest()
  metrics_out = open(job.metrics_file, "a") if job.metrics_file else None
  try:
    with mesh_context(job.mesh):
      job.loop(stop, metrics_out)
  finally:
    stop.restore()
    if metrics_out:
      metrics_out.close()
    if job.checkpointer:
      t = time.perf_counter()
      job.checkpointer.wait()
      job.checkpointer.close()
      job.times.checkpointing += time.perf_counter() - t
  logging.info("Time: %s", job.times.summary(time.perf_counter() - started))
  return job.state
