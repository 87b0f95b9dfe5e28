"""The fp8 model of the paper's Sec. 6.2: which weights are quantized (the feed-forward of every
layer but the first and last), its feed-forward against the numpy reference of fbgemm's
quantization, closeness to the unquantized model, sharding, and Hugging Face's fbgemm_fp8
checkpoint layout (Meta's FP8 release) in both directions."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.inference.quantize import quantize_params
from llama3_jax.model.layers import FP8FeedForward
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.layout import Layout
from hf_reference import hf_reference
from test_fp8 import reference_quantize

FFN = ("w1", "w3", "w2")


def same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_trees(expected, got):
  assert jax.tree.structure(expected) == jax.tree.structure(got)
  for path, a in jax.tree_util.tree_flatten_with_path(expected)[0]:
    b = got
    for key in path:
      b = b[key.key]
    assert same_bits(a, b), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def model():
  """A 4-layer random model in bfloat16 storage, and its fp8 version."""
  cfg = l3.get_config("test-3.1", n_layers=4, param_dtype="bfloat16")
  params = l3.init_params(cfg, jax.random.key(3))
  return cfg, params, *quantize_params(cfg, params)


def test_only_the_middle_layers_feed_forward_is_quantized(model):
  """Layers 0 and 3 are the original bits; layers 1-2 keep attention and norms, and their w1, w3,
  w2 become the reference's e4m3 values with one scale per output channel."""
  cfg, params, fp8_cfg, quantized = model
  assert fp8_cfg.quantization == "fp8" and fp8_cfg.fp8_activation_scale_ub == 1200.0
  layers = params["layers"]
  assert_same_trees(jax.tree.map(lambda w: w[:1], layers), quantized["first_layer"])
  assert_same_trees(jax.tree.map(lambda w: w[3:], layers), quantized["last_layer"])
  middle = quantized["layers"]
  for group in ("attention", "attention_norm", "ffn_norm"):
    assert_same_trees(jax.tree.map(lambda w: w[1:3], layers[group]), middle[group])
  for name in FFN:
    values, scales = middle["feed_forward"][name], middle["feed_forward"][f"{name}_scale"]
    assert values.dtype == jnp.float8_e4m3fn and scales.dtype == jnp.float32
    for i in range(2):
      w_out_in = np.asarray(layers["feed_forward"][name][i + 1], np.float32).T  # torch layout
      want_values, want_scales = reference_quantize(w_out_in)
      np.testing.assert_array_equal(np.asarray(values[i], np.float64).T, want_values)
      np.testing.assert_array_equal(np.asarray(scales[i]), want_scales)
  for name in ("embedding", "final_norm", "output"):
    assert_same_trees(params[name], quantized[name])


def test_fp8_needs_a_first_and_last_layer_a_known_method_and_no_training():
  with pytest.raises(ValueError, match="n_layers >= 3"):
    l3.get_config("test-3.1", quantization="fp8")
  with pytest.raises(ValueError, match="quantization must be one of"):
    l3.get_config("test-3.1", n_layers=4, quantization="int8")
  cfg, params = l3.get_config("test-3.1", n_layers=4), None
  fp8_cfg = cfg.replace(quantization="fp8")
  with pytest.raises(ValueError, match="already quantized"):
    quantize_params(fp8_cfg, params)
  with pytest.raises(ValueError, match="for inference"):
    Layout.build(fp8_cfg, MeshConfig())


def reference_fp8_matmul(x, values_DF, scales_F, scale_ub):
  """numpy: x [N, D] quantized per row with `scale_ub`, times e4m3 [D, F] values, both scales."""
  x_values, x_scales = reference_quantize(x, scale_ub)
  return (x_values @ np.asarray(values_DF, np.float64)) * x_scales[:, None] * np.asarray(scales_F)


def test_fp8_feed_forward_equals_the_numpy_reference(model):
  """The SwiGLU with each of its three inputs (x, and silu(w1 x) * w3 x) quantized per token with
  the 1200 bound, against numpy; an outlier token engages the bound."""
  _, _, fp8_cfg, quantized = model
  ffn = jax.tree.map(lambda w: w[0], quantized["layers"]["feed_forward"])
  x = np.random.default_rng(0).standard_normal((1, 6, fp8_cfg.dim)).astype(np.float32)
  x[0, 2, 5] = 3000.0
  got = FP8FeedForward(fp8_cfg).apply({"params": ffn}, jnp.asarray(x))
  ub = fp8_cfg.fp8_activation_scale_ub
  gate = reference_fp8_matmul(x[0], ffn["w1"], ffn["w1_scale"], ub)
  up = reference_fp8_matmul(x[0], ffn["w3"], ffn["w3_scale"], ub)
  hidden = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
  want = reference_fp8_matmul(hidden, ffn["w2"], ffn["w2_scale"], ub)
  assert got.dtype == jnp.float32  # the preset's compute dtype
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_fp8_model_stays_close_to_the_unquantized_one(model):
  """Random weights: KL(unquantized || fp8) of the next-token distributions below 1e-3 nats and
  >= 90% of argmaxes the same, but not the same logits."""
  cfg, params, fp8_cfg, quantized = model
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, cfg.vocab_size)
  exact = l3.Transformer(cfg).apply({"params": params}, tokens)
  fp8 = l3.Transformer(fp8_cfg).apply({"params": quantized}, tokens)
  log_p, log_q = jax.nn.log_softmax(exact), jax.nn.log_softmax(fp8)
  kl = float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)))
  assert 0 < kl < 1e-3
  assert float(jnp.mean(exact.argmax(-1) == fp8.argmax(-1))) >= 0.9


def test_fp8_model_on_a_mesh_shards_like_the_original_and_generates_the_same_tokens():
  """Quantized into its shards on fsdp=2 x tensor=2: the e4m3 values shard as the weights they
  replace, the scales along the output axis; greedy tokens equal one device's."""
  cfg = l3.get_config("test-3.1", n_layers=4, param_dtype="bfloat16")
  params = l3.init_params(cfg, jax.random.key(5))
  fp8_cfg, quantized = quantize_params(cfg, params)
  prompts = [[5, 17, 300, 42], [77, 3], [400, 401, 402]]
  expected = l3.generate(fp8_cfg, quantized, prompts, max_new_tokens=6)
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
  _, sharded = quantize_params(cfg, params, mesh=mesh)
  original = l3.model.spec.LM.shard(cfg, params, mesh)
  for name in FFN:
    values = sharded["layers"]["feed_forward"][name]
    assert values.sharding.spec == original["layers"]["feed_forward"][name].sharding.spec
    layer_axis, *_, out_axis = values.sharding.spec
    scales = sharded["layers"]["feed_forward"][f"{name}_scale"]
    assert scales.sharding.spec == jax.sharding.PartitionSpec(layer_axis, out_axis)
  assert_same_trees(quantized, jax.device_get(sharded))
  assert l3.generate(fp8_cfg, sharded, prompts, max_new_tokens=6, mesh=mesh) == expected
  pipeline = make_mesh(MeshConfig.parse("pipeline=2,tensor=2"), jax.devices()[:4])
  with pytest.raises(ValueError, match="runs without pipeline stages"):
    quantize_params(cfg, params, mesh=pipeline)


def test_our_fbgemm_fp8_checkpoint_loads_back_bit_exactly(model, tmp_path):
  """save_hf of an fp8 model: config.json's quantization_config as Meta's release; the quantized
  linears stored as transformers' FbgemmFp8Linear holds them; loaded back bit for bit."""
  _, _, fp8_cfg, quantized = model
  l3.save_hf(str(tmp_path), fp8_cfg, quantized)
  quant = json.load(open(tmp_path / "config.json"))["quantization_config"]
  assert quant["quant_method"] == "fbgemm_fp8" and quant["activation_scale_ub"] == 1200.0
  skipped = set(quant["modules_to_not_convert"])
  assert "lm_head" in skipped and "model.layers.0.mlp.down_proj" in skipped
  assert "model.layers.3.mlp.gate_proj" in skipped and "model.layers.2.self_attn.q_proj" in skipped
  assert not any(m.startswith(("model.layers.1.mlp", "model.layers.2.mlp")) for m in skipped)
  tensors = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
  reference = FbgemmFp8Linear(fp8_cfg.dim, fp8_cfg.ffn_dim, bias=False).state_dict()
  for suffix in ("weight", "weight_scale"):
    stored = tensors[f"model.layers.1.mlp.up_proj.{suffix}"]
    assert stored.dtype == reference[suffix].dtype and stored.shape == reference[suffix].shape
  assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
  assert "model.layers.0.mlp.up_proj.weight_scale" not in tensors
  cfg, loaded = l3.load_checkpoint(str(tmp_path))
  assert cfg == fp8_cfg.replace(name=cfg.name, dtype=cfg.dtype)  # HF records no compute dtype
  assert_same_trees(quantized, loaded)


def torch_quantize_rows(w):
  """fbgemm's quantize_fp8_per_row in torch: (e4m3 [out, in], float32 scales [out, 1]). The
  divisions are rounded correctly to float32 (through float64: torch's CPU float32 division can
  be an ulp off)."""
  row_max = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
  inverse = (448.0 / row_max.double()).float()
  values = (w.float() * inverse).clamp(-448, 448).to(torch.float8_e4m3fn)
  return values, (1.0 / inverse.double()).float()


def meta_fp8_modules_to_not_convert(n_layers):
  """The list of Meta's Llama-3.1-405B-Instruct-FP8 config.json, for `n_layers` layers."""
  names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(n_layers) for p in "kovq"]
  names += [
    f"model.layers.{i}.mlp.{p}_proj" for i in (0, n_layers - 1) for p in ("down", "gate", "up")
  ]
  return sorted(names) + ["lm_head"]


def test_a_hand_built_fbgemm_checkpoint_gives_our_quantizations_logits(tmp_path):
  """An FP8 checkpoint built in torch from a Hugging Face model's bfloat16 weights, tensors named
  as in Meta's FP8 release, loads to the params (bit for bit) and logits of quantizing the
  bfloat16 checkpoint ourselves."""
  cfg = l3.get_config("test-3.1", n_layers=4)
  hf_model = hf_reference(cfg, seed=11).to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / "bf16")
  state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
  for i in (1, 2):
    for proj in ("gate_proj", "up_proj", "down_proj"):
      name = f"model.layers.{i}.mlp.{proj}"
      state[f"{name}.weight"], state[f"{name}.weight_scale"] = torch_quantize_rows(
        state[f"{name}.weight"]
      )
  os.makedirs(tmp_path / "fp8")
  safetensors.torch.save_file(state, str(tmp_path / "fp8" / "model.safetensors"))
  config = json.load(open(tmp_path / "bf16" / "config.json"))
  config["quantization_config"] = {
    "activation_scale_ub": 1200.0,
    "modules_to_not_convert": meta_fp8_modules_to_not_convert(cfg.n_layers),
    "quant_method": "fbgemm_fp8",
  }
  json.dump(config, open(tmp_path / "fp8" / "config.json", "w"))

  bf16_cfg, bf16_params = l3.load_checkpoint(str(tmp_path / "bf16"), dtype="float32")
  ours_cfg, ours = quantize_params(bf16_cfg, bf16_params)
  loaded_cfg, loaded = l3.load_checkpoint(str(tmp_path / "fp8"), dtype="float32")
  assert loaded_cfg.quantization == "fp8" and loaded_cfg.param_dtype == "bfloat16"
  assert_same_trees(jax.device_get(ours), loaded)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
  np.testing.assert_array_equal(
    l3.Transformer(loaded_cfg).apply({"params": loaded}, tokens),
    l3.Transformer(ours_cfg).apply({"params": ours}, tokens),
  )


def test_fbgemm_configs_that_quantize_other_modules_are_refused(model, tmp_path):
  _, _, fp8_cfg, quantized = model
  l3.save_hf(str(tmp_path), fp8_cfg, quantized)
  config_file = tmp_path / "config.json"
  config = json.load(open(config_file))
  for quant, message in [
    ({**config["quantization_config"], "quant_method": "awq"}, "quant_method 'awq'"),
    ({**config["quantization_config"], "modules_to_not_convert": ["lm_head"]}, "self_attn"),
    ({**config["quantization_config"], "modules_to_not_convert": None}, "self_attn"),
  ]:
    json.dump({**config, "quantization_config": quant}, open(config_file, "w"))
    with pytest.raises(ValueError, match=message):
      l3.load_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="not a load override"):
    l3.load_checkpoint(str(tmp_path), quantization="fp8")
