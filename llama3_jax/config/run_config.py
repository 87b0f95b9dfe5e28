"""One description of a training run: model, mesh, optimizer, data, training and checkpointing."""

import dataclasses
from typing import Optional

from llama3_jax.config.data_config import DataConfig
from llama3_jax.config.mesh_config import MeshConfig
from llama3_jax.config.model_config import ModelConfig
from llama3_jax.config.optimizer_config import OptimizerConfig
from llama3_jax.config.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """`directory` None disables checkpoints; a save every `save_every` steps, the newest `keep` kept."""

  directory: Optional[str] = None
  save_every: int = 100
  keep: int = 3
  async_save: bool = True

  def __post_init__(self):
    if self.save_every < 1 or self.keep < 1:
      raise ValueError(f"CheckpointConfig.save_every and keep must be >= 1: {self}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "RunConfig":
    return cls(
      model=ModelConfig.from_dict(d["model"]),
      mesh=MeshConfig(**d["mesh"]),
      optimizer=OptimizerConfig(**d["optimizer"]),
      data=DataConfig.from_dict(d["data"]),
      train=TrainConfig(**d["train"]),
      checkpoint=CheckpointConfig(**d["checkpoint"]),
    )
