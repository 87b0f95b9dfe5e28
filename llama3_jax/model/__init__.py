"""The Llama 3 model: layers, attention and masks, RoPE, the transformer and its KV cache."""

from llama3_jax.model.kv_cache import KVCache
from llama3_jax.model.transformer import Transformer
from llama3_jax.model.params import count_params, init_params, param_shapes
