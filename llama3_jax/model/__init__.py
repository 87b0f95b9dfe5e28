"""The Llama 3 model: layers, attention and masks, RoPE, the transformer and its KV cache.

Logical axis names (mapped onto a mesh by one rules table, outside the model):
  parameters:  layers, vocab, embed, heads, kv_heads, head_dim, mlp, norm
  activations: batch, length, kv_length, act_embed, act_heads, act_kv_heads, act_head_dim, act_mlp, act_vocab
Activations have their own names so that sharding a parameter axis (FSDP on `embed`) does not
shard the activations along it.
"""

from llama3_jax.model.kv_cache import KVCache
from llama3_jax.model.transformer import DecoderStack, Transformer, unrolled_layers
from llama3_jax.model.params import count_params, init_params, param_shapes
from llama3_jax.model.reward_model import RewardModel
