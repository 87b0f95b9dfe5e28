"""The Layout: how a training run spreads over its mesh, decided once (the "parallelize" step).

Built from the model config, the mesh (a MeshConfig, a Mesh, or an AbstractMesh for planning
without the devices) and the train config, it holds the mesh, its logical rules, the pipeline
schedule and the degrees a step splits its work by; it checks batch shapes against them with
named errors before any compile, and jits the train step and the evaluation. Code that needs a
degree takes the Layout; none reads one from the ambient mesh: the Layout's jitted functions trace
under its own mesh and rules, whatever mesh is current.

It builds on train's step (train/train_step.py), so it is imported from here rather than from
`llama3_jax.parallel`.
"""

import dataclasses
import functools
from typing import Callable, Dict, Optional, Union

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from llama3_jax.config import MeshConfig, ModelConfig, TrainConfig
from llama3_jax.model.masks import load_balanced_order
from llama3_jax.parallel.mesh import make_mesh
from llama3_jax.parallel.pipeline import PipelineSchedule, rows_over_pipeline
from llama3_jax.parallel.rules import Rules, batch_degree, mesh_rules
from llama3_jax.parallel.sharding import batch_sharding
from llama3_jax.train.train_state import state_shardings
from llama3_jax.train.train_step import loss_sums_and_grads, make_train_step


@dataclasses.dataclass(frozen=True)
class Layout:
  """`model` and `train` on `mesh` under `rules` (`mesh_rules(mesh)`), with the pipeline
  `schedule` (None without a `pipeline` axis) and `head_over_pipeline`: whether the embedding and
  the head split their rows over the pipeline ranks as well as over the batch shards. Make one
  with `Layout.build`."""

  model: ModelConfig
  train: TrainConfig
  mesh: Union[Mesh, AbstractMesh]
  rules: Rules
  schedule: Optional[PipelineSchedule]
  head_over_pipeline: bool

  @classmethod
  def build(
    cls,
    model: ModelConfig,
    mesh: Union[MeshConfig, Mesh, AbstractMesh],
    train: TrainConfig = TrainConfig(),
  ) -> "Layout":
    """The Layout of `model` and `train` on `mesh` (a MeshConfig: over all devices). The pipeline
    micro-batches default to the stages; the head's rows go over the pipeline ranks too when the
    micro-batches are a multiple of the stages, so that every batch `check_batch` accepts splits."""
    if model.quantization is not None:
      raise ValueError(
        f"The model {model.name} is quantized ({model.quantization}), which is for inference: "
        "train the unquantized model and quantize it afterwards"
      )
    if isinstance(mesh, MeshConfig):
      mesh = make_mesh(mesh)
    stages = mesh.shape["pipeline"]
    schedule = None
    if stages > 1:
      schedule = PipelineSchedule(
        stages, train.pipeline_micro_batches or stages, train.pipeline_interleave
      )
    head_over_pipeline = schedule is not None and schedule.splits_rows_over_stages
    layout = cls(model, train, mesh, mesh_rules(mesh), schedule, head_over_pipeline)
    layout._log()
    return layout

  def _log(self) -> None:
    logging.info(
      "Layout on mesh %s: batch split %d ways (data x fsdp) and %d times per step, context "
      "degree %d",
      self.degrees,
      self.batch_degree,
      self.batch_splits,
      self.context_degree,
    )
    if self.schedule:
      s = self.schedule
      logging.info(
        "Pipeline: %d stages x %d virtual, %d micro-batches, bubble fraction %.3f; embedding and "
        "head rows over %s",
        s.stages,
        s.interleave,
        s.micro_batches,
        s.bubble_fraction,
        "the batch shards and the pipeline ranks"
        if self.head_over_pipeline
        else f"the batch shards only ({s.micro_batches} micro-batches are not a multiple of "
        f"{s.stages} stages)",
      )

  @property
  def degrees(self) -> Dict[str, int]:
    """{mesh axis: degree}."""
    return dict(self.mesh.shape)

  @property
  def batch_degree(self) -> int:
    """Shards of the batch rows (data x fsdp)."""
    return batch_degree(self.mesh)

  @property
  def context_degree(self) -> int:
    """Shards of each row's sequence (context parallelism)."""
    return self.mesh.shape["context"]

  @property
  def pipeline_stages(self) -> int:
    return self.mesh.shape["pipeline"]

  @property
  def batch_splits(self) -> int:
    """Pieces a batch is cut into along its rows: gradient micro-batches x pipeline micro-batches."""
    return self.train.micro_batches * (self.schedule.micro_batches if self.schedule else 1)

  @property
  def head_rules(self) -> Rules:
    """The rules of the embedding and of the head (and the loss): `rules`, with the rows over the
    pipeline ranks too when `head_over_pipeline`."""
    return rows_over_pipeline(self.rules) if self.head_over_pipeline else self.rules

  @property
  def batch_sharding(self) -> NamedSharding:
    """[B, ...] batch arrays split over the batch axes along B."""
    return batch_sharding(self.mesh)

  def check_layers(self) -> None:
    """Raises ValueError unless the layers split into the pipeline's virtual stages."""
    if self.schedule:
      self.schedule.check_layers(self.model.n_layers)

  def check_batch(self, global_batch_size: int, seq_len: int, where: str = "") -> None:
    """Raises ValueError, naming the values, `where` (e.g. a ramp stage) and the mesh, unless
    `global_batch_size` rows divide into `batch_splits` pieces of whole rows per batch shard and
    rows of `seq_len` inputs split for context parallelism."""
    at = f" ({where})" if where else ""
    multiple = self.batch_degree * self.batch_splits
    if global_batch_size % multiple:
      raise ValueError(
        f"global_batch_size={global_batch_size}{at} does not divide into {self.batch_splits} "
        f"(pipeline) micro-batches (micro_batches={self.train.micro_batches} x pipeline "
        f"micro-batches {self.batch_splits // self.train.micro_batches}) over the "
        f"{self.batch_degree} data x fsdp shards of mesh {self.degrees}: it needs a multiple of "
        f"{multiple}"
      )
    if self.context_degree > 1:
      try:
        load_balanced_order(seq_len, self.context_degree)
      except ValueError as e:
        raise ValueError(f"seq_len={seq_len}{at} on mesh {self.degrees}: {e}") from None

  def place(self, batch: Dict) -> Dict:
    """This process's rows of a host batch's [B, ...] arrays -> global arrays split over the batch
    shards."""
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
      for k, v in batch.items()
    }

  def traced(self, fn: Callable) -> Callable:
    """`fn` run under the Layout's mesh (abstract: `fn` is traced inside jit) and rules."""

    @functools.wraps(fn)
    def under_layout(*args):
      with (
        jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh),
        nn.logical_axis_rules(self.rules),
      ):
        return fn(*args)

    return under_layout

  def state_shardings(self, tx: optax.GradientTransformation):
    """NamedShardings of the TrainState of `model` with optimizer `tx` (see train_state.py)."""
    return state_shardings(self.model, tx, self.mesh)

  def jit_step(self, step: Callable, shardings, *rest_shardings) -> Callable:
    """`step(state, batch, *rest) -> (state, metrics)` jitted under the Layout: the state donated
    and kept in `shardings`, the batch's rows split over the batch axes, each of `rest` placed by
    its entry of `rest_shardings` (None: as it comes)."""
    return jax.jit(
      self.traced(step),
      in_shardings=(shardings, self.batch_sharding, *rest_shardings),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )

  def jit_train_step(self, tx: optax.GradientTransformation, lr_schedule: optax.Schedule):
    """The jitted next-token train step (train_step.py) with the state donated; `lr_schedule`
    is only reported (`tx` applies its own)."""
    self.check_layers()
    return self.jit_step(make_train_step(self, tx, lr_schedule), self.state_shardings(tx))

  def jit_eval(self) -> Callable:
    """Jitted (params, batch) -> (cross-entropy sum, number of targets), no update."""
    return jax.jit(self.traced(lambda params, batch: loss_sums_and_grads(params, batch, self)[:2]))
