"""Model FLOPs of training, for achieved TFLOP/s and MFU."""

from llama3_jax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls: projections, FFN and the output head (not the lookup)."""
  attention = (
    cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    + cfg.n_heads * cfg.head_dim * cfg.dim
  )
  return cfg.n_layers * (attention + 3 * cfg.dim * cfg.ffn_dim) + cfg.dim * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 per matmul parameter, plus causal attention scores and
  values (2 matmuls x 2 FLOPs x 3 passes x half the [T, T] square) = 6 * layers * seq_len * dim."""
  return 6.0 * matmul_params(cfg) + 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
