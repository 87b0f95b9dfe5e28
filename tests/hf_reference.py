"""Random-weight Hugging Face Llama models used as the reference in tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def hf_reference(cfg, seed: int) -> LlamaForCausalLM:
  """A random HF model of the preset's shape, weights large enough (std 0.2) that layout errors show."""
  rope = None
  if cfg.rope_scaling is not None:
    rope = {
      "rope_type": "llama3",
      "factor": cfg.rope_scaling.factor,
      "low_freq_factor": cfg.rope_scaling.low_freq_factor,
      "high_freq_factor": cfg.rope_scaling.high_freq_factor,
      "original_max_position_embeddings": cfg.rope_scaling.original_context,
    }
  hf_cfg = LlamaConfig(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.dim,
    intermediate_size=cfg.ffn_dim,
    num_hidden_layers=cfg.n_layers,
    num_attention_heads=cfg.n_heads,
    num_key_value_heads=cfg.n_kv_heads,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,
    rope_scaling=rope,
    max_position_embeddings=cfg.max_seq_len,
    tie_word_embeddings=cfg.tie_embeddings,
    initializer_range=0.2,
    attn_implementation="eager",
  )
  torch.manual_seed(seed)
  model = LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # HF initialises norms to 1, which would hide their layout.
        p.normal_(1.0, 0.2)
  return model
