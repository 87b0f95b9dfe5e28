"""Named model presets: the published Llama 3 / 3.1 / 3.2 shapes plus small sizes for tests and CPU runs."""

from llama3_jax.config.model_config import ModelConfig, RopeScaling, meta_ffn_dim

LLAMA3_VOCAB = 128_256
LLAMA31_ROPE = RopeScaling(factor=8.0)
LLAMA32_ROPE = RopeScaling(factor=32.0)


def _llama(name, dim, n_layers, n_heads, ffn_multiplier, multiple_of, **kw) -> ModelConfig:
  return ModelConfig(
    name=name,
    vocab_size=kw.pop("vocab_size", LLAMA3_VOCAB),
    dim=dim,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=kw.pop("n_kv_heads", 8),
    ffn_dim=meta_ffn_dim(dim, ffn_multiplier, multiple_of),
    **kw,
  )


_PRESETS = [
  _llama("llama3-8b", 4096, 32, 32, 1.3, 1024),
  _llama("llama3-70b", 8192, 80, 64, 1.3, 4096),
  _llama("llama3.1-8b", 4096, 32, 32, 1.3, 1024, rope_scaling=LLAMA31_ROPE, max_seq_len=131_072),
  _llama("llama3.1-70b", 8192, 80, 64, 1.3, 4096, rope_scaling=LLAMA31_ROPE, max_seq_len=131_072),
  _llama(
    "llama3.1-405b", 16384, 126, 128, 1.2, 4096, rope_scaling=LLAMA31_ROPE, max_seq_len=131_072
  ),
  _llama(
    "llama3.2-1b",
    2048,
    16,
    32,
    1.5,
    256,
    rope_scaling=LLAMA32_ROPE,
    tie_embeddings=True,
    max_seq_len=131_072,
  ),
  _llama(
    "llama3.2-3b",
    3072,
    28,
    24,
    1.0,
    256,
    rope_scaling=LLAMA32_ROPE,
    tie_embeddings=True,
    max_seq_len=131_072,
  ),
  # Small sizes with the real vocabulary, float32 compute for CPU.
  _llama(
    "tiny",
    256,
    4,
    8,
    None,
    256,
    n_kv_heads=2,
    tie_embeddings=True,
    max_seq_len=2048,
    rope_scaling=LLAMA31_ROPE,
    dtype="float32",
  ),
  _llama(
    "llama3-100m",
    512,
    8,
    8,
    None,
    256,
    n_kv_heads=4,
    tie_embeddings=True,
    max_seq_len=4096,
    rope_scaling=LLAMA31_ROPE,
    dtype="float32",
  ),
  # Test sizes: a small vocabulary, GQA, each rope-scaling kind and both head types.
  _llama(
    "test-3.0", 64, 2, 4, None, 32, n_kv_heads=2, vocab_size=512, max_seq_len=256, dtype="float32"
  ),
  _llama(
    "test-3.1",
    64,
    2,
    4,
    None,
    32,
    n_kv_heads=2,
    vocab_size=512,
    max_seq_len=131_072,
    rope_scaling=LLAMA31_ROPE,
    dtype="float32",
  ),
  _llama(
    "test-3.2",
    64,
    2,
    4,
    None,
    32,
    n_kv_heads=1,
    vocab_size=512,
    max_seq_len=131_072,
    rope_scaling=LLAMA32_ROPE,
    tie_embeddings=True,
    dtype="float32",
  ),
]
PRESETS = {cfg.name: cfg for cfg in _PRESETS}


def get_config(name: str, **overrides) -> ModelConfig:
  """The preset `name`, with any field overridden (e.g. `dtype="float32"`)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
