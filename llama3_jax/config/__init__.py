"""Run descriptions: frozen dataclasses and named presets."""

from llama3_jax.config.model_config import ModelConfig, RopeScaling, meta_ffn_dim
from llama3_jax.config.presets import PRESETS, get_config
