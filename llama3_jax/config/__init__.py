"""Run descriptions: frozen dataclasses and named presets."""

from llama3_jax.config.model_config import (
  COMPUTE_FIELDS,
  LayerSegment,
  ModelConfig,
  RopeScaling,
  architecture_differences,
  meta_ffn_dim,
)
from llama3_jax.config.presets import PRESETS, get_config
from llama3_jax.config.mesh_config import MESH_AXES, MeshConfig
from llama3_jax.config.optimizer_config import OptimizerConfig
from llama3_jax.config.train_config import TrainConfig
from llama3_jax.config.data_config import BatchStage, DataConfig, DataSource, parse_ramp
from llama3_jax.config.run_config import CheckpointConfig, RunConfig
from llama3_jax.config.long_context_config import (
  PAPER_LONG_CONTEXT,
  LongContextConfig,
  LongContextStage,
)
from llama3_jax.config.sampling_config import SamplingConfig
from llama3_jax.config.dpo_config import DPOConfig
