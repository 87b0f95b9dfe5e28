"""One description of a training run: model, mesh, optimizer, data, training and checkpointing."""

import dataclasses
from typing import Optional

from llama3_jax.config.base import ConfigBase
from llama3_jax.config.data_config import DataConfig
from llama3_jax.config.mesh_config import MeshConfig
from llama3_jax.config.model_config import ModelConfig
from llama3_jax.config.optimizer_config import OptimizerConfig
from llama3_jax.config.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(ConfigBase):
  """`directory` None disables checkpoints; a save every `save_every` steps, the newest `keep` kept.
  `allow_data_change`: a resume may change the data settings (sources, seed, row length, batch),
  starting the data afresh; otherwise it is refused."""

  directory: Optional[str] = None
  save_every: int = 100
  keep: int = 3
  async_save: bool = True
  allow_data_change: bool = False

  def __post_init__(self):
    if self.save_every < 1 or self.keep < 1:
      raise ValueError(f"CheckpointConfig.save_every and keep must be >= 1: {self}")


@dataclasses.dataclass(frozen=True)
class RunConfig(ConfigBase):
  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def __post_init__(self):
    for stage in self.data.stages:
      if stage.seq_len > self.model.max_seq_len:
        raise ValueError(
          f"RunConfig: rows of {stage.seq_len} tokens (data.seq_len of the stage from token "
          f"{stage.start_tokens}) exceed the model's max_seq_len {self.model.max_seq_len}; "
          "shorten them or raise ModelConfig.max_seq_len"
        )

  @classmethod
  def _from_fields(cls, fields: dict) -> dict:
    parts = dict(
      model=ModelConfig,
      mesh=MeshConfig,
      optimizer=OptimizerConfig,
      data=DataConfig,
      train=TrainConfig,
      checkpoint=CheckpointConfig,
    )
    return {name: parts[name].from_dict(value) for name, value in fields.items()}
