"""Meta consolidated checkpoints: single file and model-parallel shards, against HF and Meta's reference.

The fixtures are written here from HF-layout weights with Meta's names, interleaved q/k rows and
Meta's fairscale split, independently of `llama3_jax.convert.layout`.
"""

import copy
import json
import logging
import os

import jax
import numpy as np
import pytest
import torch
from hf_reference import hf_reference
from transformers import LlamaForCausalLM

from llama3_jax import RopeScaling, Transformer, get_config
from llama3_jax.convert import load_checkpoint, load_hf, load_meta
from llama3_jax.convert.meta import config_from_meta

PRESETS = ("test-3.0", "test-3.1", "test-3.2")
BATCH, LENGTH, START = 2, 10, 100_000
# fairscale ColumnParallelLinear / VocabParallelEmbedding split the output rows, RowParallelLinear the
# input columns; everything else (norms) is replicated on every rank.
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")
ROW_PARALLEL = ("wo", "w2")
ARCH_FIELDS = (
  "vocab_size",
  "dim",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "ffn_dim",
  "norm_eps",
  "rope_theta",
  "rope_scaling",
  "tie_embeddings",
)

# Published params.json files (Meta's llama-models sku_list carries the same arch_args).
LLAMA32_1B = {
  "dim": 2048,
  "n_layers": 16,
  "n_heads": 32,
  "n_kv_heads": 8,
  "vocab_size": 128256,
  "ffn_dim_multiplier": 1.5,
  "multiple_of": 256,
  "norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "use_scaled_rope": True,
}
LLAMA32_3B = {
  "dim": 3072,
  "n_layers": 28,
  "n_heads": 24,
  "n_kv_heads": 8,
  "vocab_size": 128256,
  "ffn_dim_multiplier": 1.0,
  "multiple_of": 256,
  "norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "use_scaled_rope": True,
}
LLAMA31_8B = {
  "dim": 4096,
  "n_layers": 32,
  "n_heads": 32,
  "n_kv_heads": 8,
  "vocab_size": 128256,
  "ffn_dim_multiplier": 1.3,
  "multiple_of": 1024,
  "norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "use_scaled_rope": True,
}
LLAMA3_8B = {
  "dim": 4096,
  "n_layers": 32,
  "n_heads": 32,
  "n_kv_heads": 8,
  "vocab_size": 128256,
  "multiple_of": 1024,
  "ffn_dim_multiplier": 1.3,
  "norm_eps": 1e-05,
  "rope_theta": 500000.0,
}


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
  """Inverse of HF's `permute` (convert_llama_weights_to_hf.py), which maps Meta's interleaved
  rotary pairs to HF's half-split layout: w.view(h, rows/h/2, 2, cols).transpose(1, 2)."""
  rows, cols = w.shape
  return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_dict(model: LlamaForCausalLM, n_heads: int, n_kv_heads: int):
  """Meta's tensor names and layout for the HF model's weights (output.weight always present)."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  meta = {
    "tok_embeddings.weight": sd["model.embed_tokens.weight"],
    "norm.weight": sd["model.norm.weight"],
    "output.weight": model.get_output_embeddings().weight.detach().clone(),
  }
  for i in range(model.config.num_hidden_layers):
    hf = {
      name: sd[f"model.layers.{i}.{name}.weight"]
      for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.down_proj",
        "mlp.up_proj",
        "input_layernorm",
        "post_attention_layernorm",
      )
    }
    meta.update(
      {
        f"layers.{i}.attention.wq.weight": hf_to_interleaved(hf["self_attn.q_proj"], n_heads),
        f"layers.{i}.attention.wk.weight": hf_to_interleaved(hf["self_attn.k_proj"], n_kv_heads),
        f"layers.{i}.attention.wv.weight": hf["self_attn.v_proj"],
        f"layers.{i}.attention.wo.weight": hf["self_attn.o_proj"],
        f"layers.{i}.feed_forward.w1.weight": hf["mlp.gate_proj"],
        f"layers.{i}.feed_forward.w2.weight": hf["mlp.down_proj"],
        f"layers.{i}.feed_forward.w3.weight": hf["mlp.up_proj"],
        f"layers.{i}.attention_norm.weight": hf["input_layernorm"],
        f"layers.{i}.ffn_norm.weight": hf["post_attention_layernorm"],
      }
    )
  return meta


def split_model_parallel(state_dict, n: int):
  """The n rank-local state dicts that Meta's fairscale model would hold."""
  shards = [{} for _ in range(n)]
  for name, w in state_dict.items():
    kind = name.split(".")[-2]
    if kind in COLUMN_PARALLEL:
      parts = w.chunk(n, dim=0)
    elif kind in ROW_PARALLEL:
      parts = w.chunk(n, dim=1)
    else:
      parts = [w] * n
    for shard, part in zip(shards, parts):
      shard[name] = part.clone()
  return shards


def params_json(cfg):
  return {
    "dim": cfg.dim,
    "n_layers": cfg.n_layers,
    "n_heads": cfg.n_heads,
    "n_kv_heads": cfg.n_kv_heads,
    "vocab_size": cfg.vocab_size,
    "multiple_of": 32,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": cfg.rope_scaling is not None,
  }


def write_meta(path, params, state_dict, n_shards: int = 1, dtype=torch.float32) -> str:
  os.makedirs(path)
  with open(os.path.join(path, "params.json"), "w") as f:
    json.dump(params, f)
  state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
  for rank, shard in enumerate(split_model_parallel(state_dict, n_shards)):
    torch.save(shard, os.path.join(path, f"consolidated.{rank:02d}.pth"))
  return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """preset -> (HF model, HF dir, Meta single-file dir, Meta 2-shard dir or None, Meta state dict)."""
  out = {}
  for seed, name in enumerate(PRESETS):
    cfg = get_config(name)
    model = hf_reference(cfg, seed)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(str(root / "hf"))
    meta = meta_state_dict(model, cfg.n_heads, cfg.n_kv_heads)
    single = write_meta(root / "meta1", params_json(cfg), meta)
    # Meta's reference needs whole kv heads per rank, so one kv head cannot be split two ways.
    sharded = (
      write_meta(root / "meta2", params_json(cfg), meta, 2) if cfg.n_kv_heads % 2 == 0 else None
    )
    out[name] = (model, str(root / "hf"), single, sharded, meta)
  return out


def inputs(vocab_size: int):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, vocab_size, (BATCH, LENGTH))
  return tokens, np.broadcast_to(START + np.arange(LENGTH), (BATCH, LENGTH))


def our_logits(cfg, params, tokens, positions) -> np.ndarray:
  return np.asarray(Transformer(cfg).apply({"params": params}, tokens, positions))


@pytest.mark.parametrize(
  "name,n_shards",
  [("test-3.0", 1), ("test-3.0", 2), ("test-3.1", 1), ("test-3.1", 2), ("test-3.2", 1)],
)
def test_meta_equals_hf(checkpoints, name, n_shards):
  """Same config and bit-identical params as the HF path for the same weights; logits equal HF's."""
  model, hf_dir, single, sharded, _ = checkpoints[name]
  cfg, params = load_meta(single if n_shards == 1 else sharded, dtype="float32")
  hf_cfg, hf_params = load_hf(hf_dir, dtype="float32")
  assert cfg.name == name
  for field in ARCH_FIELDS:
    assert getattr(cfg, field) == getattr(hf_cfg, field), field
  assert jax.tree.structure(params) == jax.tree.structure(hf_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
    np.testing.assert_array_equal(a, b)
  tokens, positions = inputs(cfg.vocab_size)
  got = our_logits(cfg, params, tokens, positions)
  with torch.no_grad():
    expected = model(torch.tensor(tokens), position_ids=torch.tensor(positions)).logits.numpy()
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
  """A 1-process gloo group with fairscale model parallelism of 1, for Meta's reference model."""
  import torch.distributed as dist

  fs_init = pytest.importorskip("fairscale.nn.model_parallel.initialize")
  init_file = tmp_path_factory.mktemp("dist") / "init"
  dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
  fs_init.initialize_model_parallel(1)
  yield
  fs_init.destroy_model_parallel()
  dist.destroy_process_group()


@pytest.mark.parametrize("name", PRESETS)
def test_matches_meta_reference(checkpoints, model_parallel, name):
  """Meta's own `llama_models` Transformer on the single-file checkpoint, at positions from 100000.

  The reference hard-codes rope factor 8, so the 3.2-shaped checkpoint is loaded with factor 8 here.
  """
  from llama_models.llama3.args import ModelArgs
  from llama_models.llama3.model import Transformer as MetaTransformer
  from llama_models.llama3.model import precompute_freqs_cis

  _, _, single, _, meta = checkpoints[name]
  cfg = get_config(name)
  reference = MetaTransformer(
    ModelArgs(**params_json(cfg), max_seq_len=LENGTH, max_batch_size=BATCH)
  )
  reference.load_state_dict(meta)
  # Rotary angles for positions START.. (the reference's KV cache would otherwise start at 0).
  reference.freqs_cis = precompute_freqs_cis(
    cfg.head_dim, START + LENGTH, 500000.0, cfg.rope_scaling is not None
  )[START:]
  tokens, positions = inputs(cfg.vocab_size)
  expected = reference(torch.tensor(tokens), 0).numpy()
  factor = 8.0 if cfg.rope_scaling is not None else None
  ours_cfg, params = load_meta(single, rope_scaling_factor=factor, dtype="float32")
  np.testing.assert_allclose(
    our_logits(ours_cfg, params, tokens, positions), expected, atol=1e-4, rtol=0
  )


def test_bfloat16_is_lossless(checkpoints, tmp_path):
  """bf16 shards load bit-exactly (same bits as the HF path) and keep bf16 as param_dtype."""
  model, _, _, _, meta = checkpoints["test-3.1"]
  cfg = get_config("test-3.1")
  meta_dir = write_meta(tmp_path / "meta", params_json(cfg), meta, 2, dtype=torch.bfloat16)
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
  meta_cfg, meta_params = load_checkpoint(meta_dir)
  hf_cfg, hf_params = load_checkpoint(str(tmp_path / "hf"))
  assert meta_cfg.param_dtype == hf_cfg.param_dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(meta_params), jax.tree.leaves(hf_params)):
    assert a.dtype == b.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_output_head_tying_follows_the_checkpoint(checkpoints, tmp_path):
  """A 3.2-shaped checkpoint whose output.weight equals the embedding (as Meta ships it) or is
  absent loads tied; one with a distinct output.weight keeps its own head."""
  _, _, single, _, meta = checkpoints["test-3.2"]
  cfg = get_config("test-3.2")
  assert load_meta(single)[0].tie_embeddings
  no_output = {k: v for k, v in meta.items() if k != "output.weight"}
  assert load_meta(write_meta(tmp_path / "no_output", params_json(cfg), no_output))[
    0
  ].tie_embeddings
  untied = dict(meta, **{"output.weight": torch.randn(cfg.vocab_size, cfg.dim)})
  untied_cfg, params = load_meta(write_meta(tmp_path / "untied", params_json(cfg), untied))
  assert not untied_cfg.tie_embeddings
  np.testing.assert_array_equal(params["output"], untied["output.weight"].numpy().T)


@pytest.mark.parametrize(
  "params,factor,tied,ffn_dim",
  [
    (LLAMA32_1B, 32.0, True, 8192),
    (LLAMA32_3B, 32.0, True, 8192),
    (LLAMA31_8B, 8.0, False, 14336),
    (LLAMA3_8B, None, False, 14336),
  ],
)
def test_config_from_published_params_json(params, factor, tied, ffn_dim):
  cfg = config_from_meta(params)
  assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == factor
  if factor is not None:
    assert cfg.rope_scaling == RopeScaling(
      factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192
    )
  assert (cfg.tie_embeddings, cfg.ffn_dim, cfg.vocab_size) == (tied, ffn_dim, 128256)
  assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (
    params["dim"],
    params["n_layers"],
    params["n_heads"],
    params["n_kv_heads"],
  )


def test_rope_factor_override_and_unknown_shape(caplog):
  caplog.set_level(logging.INFO)
  assert config_from_meta(LLAMA32_1B, rope_scaling_factor=16.0).rope_scaling.factor == 16.0
  assert "given explicitly" in caplog.text
  caplog.clear()
  unknown = dict(LLAMA31_8B, n_layers=3)
  assert config_from_meta(unknown).rope_scaling.factor == 8.0
  assert "factor 8.0" in caplog.text and "no preset has this shape" in caplog.text
  with pytest.raises(ValueError, match="use_scaled_rope"):
    config_from_meta(LLAMA3_8B, rope_scaling_factor=8.0)
  with pytest.raises(ValueError, match="quantization_args"):
    config_from_meta(
      dict(LLAMA32_1B, quantization_args={"scheme": "int4_weight_int8_dynamic_activation"})
    )
