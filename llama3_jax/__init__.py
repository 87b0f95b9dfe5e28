"""llama3_jax: Meta's Llama 3 family in JAX/Flax."""

from llama3_jax.config import PRESETS, ModelConfig, RopeScaling, get_config
from llama3_jax.convert import checkpoint_kind, load_checkpoint, save_hf, save_orbax
from llama3_jax.inference import SamplingConfig, generate
from llama3_jax.model import (
  KVCache,
  RewardModel,
  Transformer,
  count_params,
  init_params,
  param_shapes,
)
from llama3_jax.tokenizer import ChatFormat, Message, Tokenizer, ToolCall
