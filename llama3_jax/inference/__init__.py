"""Inference: KV-cache generation and sampling."""

from llama3_jax.inference.generate import decode_step, generate, generate_tokens, prefill
from llama3_jax.inference.sampling import SamplingConfig, sample
