"""Bad checkpoints fail early with errors that name the path, the tensor and the shapes; bad
config files name the file and the key; tensors the config does not use are an error."""

import json
import os
import re

import numpy as np
import pytest
import safetensors.numpy
import torch

from llama3_jax import get_config
from llama3_jax.convert import load_checkpoint, load_hf, load_meta, save_hf

CFG = get_config("test-3.0")  # dim 64, 2 layers, 4 heads, 2 kv heads of 16, ffn 192, vocab 512
PARAMS_JSON = {
  "dim": 64,
  "n_layers": 2,
  "n_heads": 4,
  "n_kv_heads": 2,
  "vocab_size": 512,
  "multiple_of": 32,
  "norm_eps": 1e-05,
  "rope_theta": 500000.0,
}


def hf_tensors():
  """Random tensors with Hugging Face names and shapes for test-3.0."""
  rng = np.random.default_rng(0)
  shapes = {
    "model.embed_tokens.weight": (512, 64),
    "model.norm.weight": (64,),
    "lm_head.weight": (512, 64),
  }
  for i in range(2):
    shapes.update(
      {
        f"model.layers.{i}.self_attn.q_proj.weight": (64, 64),
        f"model.layers.{i}.self_attn.k_proj.weight": (32, 64),
        f"model.layers.{i}.self_attn.v_proj.weight": (32, 64),
        f"model.layers.{i}.self_attn.o_proj.weight": (64, 64),
        f"model.layers.{i}.mlp.gate_proj.weight": (192, 64),
        f"model.layers.{i}.mlp.up_proj.weight": (192, 64),
        f"model.layers.{i}.mlp.down_proj.weight": (64, 192),
        f"model.layers.{i}.input_layernorm.weight": (64,),
        f"model.layers.{i}.post_attention_layernorm.weight": (64,),
      }
    )
  return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


HF_CONFIG = {
  "model_type": "llama",
  "vocab_size": 512,
  "hidden_size": 64,
  "intermediate_size": 192,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0,
  "max_position_embeddings": 256,
  "tie_word_embeddings": False,
  "torch_dtype": "float32",
}


def write_hf(path, tensors, **config_changes):
  """An HF checkpoint directory of `tensors`, its config.json HF_CONFIG with `config_changes`
  (a value of None removes the key)."""
  os.makedirs(path)
  config = {k: v for k, v in {**HF_CONFIG, **config_changes}.items() if v is not None}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


def meta_tensors():
  """Random tensors with Meta names and (unsharded) shapes for test-3.0."""
  tensors = {
    "tok_embeddings.weight": torch.randn(512, 64),
    "norm.weight": torch.randn(64),
    "output.weight": torch.randn(512, 64),
  }
  for i in range(2):
    for name, shape in (
      ("attention.wq", (64, 64)),
      ("attention.wk", (32, 64)),
      ("attention.wv", (32, 64)),
      ("attention.wo", (64, 64)),
      ("feed_forward.w1", (192, 64)),
      ("feed_forward.w3", (192, 64)),
      ("feed_forward.w2", (64, 192)),
      ("attention_norm", (64,)),
      ("ffn_norm", (64,)),
    ):
      tensors[f"layers.{i}.{name}.weight"] = torch.randn(*shape)
  return tensors


def write_meta(path, shards, params=PARAMS_JSON):
  os.makedirs(path)
  with open(os.path.join(path, "params.json"), "w") as f:
    json.dump(params, f)
  for rank, shard in shards.items():
    torch.save(shard, os.path.join(path, f"consolidated.{rank:02d}.pth"))
  return str(path)


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_checkpoint(str(tmp_path / "nowhere"))


def test_file_instead_of_directory(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="is a file; expected a checkpoint directory"):
    load_checkpoint(str(tmp_path / "model.safetensors"))


def test_unrecognised_directory_lists_its_files(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"\0")
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(
    ValueError, match=r"not a recognised checkpoint: found \['notes.txt', 'weights.bin'\]"
  ):
    load_checkpoint(str(tmp_path))


def test_hf_loads_when_well_formed(tmp_path):
  """The fixture below is valid as written, so the failures that follow come from the edits alone."""
  tensors = hf_tensors()
  cfg, params = load_checkpoint(write_hf(tmp_path / "hf", tensors))
  assert (cfg.dim, cfg.ffn_dim, cfg.n_kv_heads) == (64, 192, 2)
  np.testing.assert_array_equal(
    params["layers"]["feed_forward"]["w2"][1], tensors["model.layers.1.mlp.down_proj.weight"].T
  )


def test_hf_shape_mismatch_names_tensor_and_shapes(tmp_path):
  tensors = hf_tensors()
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
  with pytest.raises(
    ValueError,
    match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape "
    r"\(48, 64\) .* expects \(32, 64\)",
  ):
    load_hf(write_hf(tmp_path / "hf", tensors))


def test_hf_missing_tensor(tmp_path):
  tensors = hf_tensors()
  del tensors["model.layers.0.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
    load_checkpoint(write_hf(tmp_path / "hf", tensors))


def test_rope_scaling_factor_only_for_meta(tmp_path):
  with pytest.raises(ValueError, match="only to Meta checkpoints"):
    load_checkpoint(write_hf(tmp_path / "hf", hf_tensors()), rope_scaling_factor=8.0)


def test_meta_loads_when_well_formed(tmp_path):
  tensors = meta_tensors()
  cfg, params = load_checkpoint(write_meta(tmp_path / "meta", {0: tensors}))
  assert (cfg.dim, cfg.ffn_dim, cfg.n_kv_heads, cfg.tie_embeddings) == (64, 192, 2, False)
  np.testing.assert_array_equal(params["output"], tensors["output.weight"].numpy().T)


def test_meta_without_pth(tmp_path):
  path = write_meta(tmp_path / "meta", {})
  with pytest.raises(FileNotFoundError, match=f"No consolidated.NN.pth .* {path}"):
    load_checkpoint(path)


def test_meta_without_params_json(tmp_path):
  path = write_meta(tmp_path / "meta", {0: meta_tensors()})
  os.remove(os.path.join(path, "params.json"))
  with pytest.raises(FileNotFoundError, match=f"No params.json .* {path}"):
    load_checkpoint(path)


def test_meta_missing_tensor_names_shard(tmp_path):
  tensors = meta_tensors()
  del tensors["layers.1.feed_forward.w3.weight"]
  with pytest.raises(
    ValueError, match=r"consolidated\.00\.pth has no tensor 'layers\.1\.feed_forward\.w3\.weight'"
  ):
    load_meta(write_meta(tmp_path / "meta", {0: tensors}))


def test_meta_shard_numbering_gap(tmp_path):
  tensors = meta_tensors()
  with pytest.raises(
    ValueError, match=r"consolidated\.00\.pth to consolidated\.01\.pth with no gaps"
  ):
    load_meta(write_meta(tmp_path / "meta", {0: tensors, 2: tensors}))


def test_meta_shards_that_do_not_add_up(tmp_path):
  """Two files each holding the whole model (not a model-parallel split): the first column-parallel
  tensor comes out twice as tall, and the error says so with both shapes."""
  tensors = meta_tensors()
  with pytest.raises(
    ValueError,
    match=r"'tok_embeddings\.weight' assembled from 2 shard\(s\) has shape "
    r"\(1024, 64\) .* expects \(512, 64\)",
  ):
    load_meta(write_meta(tmp_path / "meta", {0: tensors, 1: tensors}))


def test_pickled_code_is_refused_not_run(tmp_path):
  marker = tmp_path / "was_executed"

  class Payload:
    def __reduce__(self):
      return os.mkdir, (str(marker),)

  tensors = dict(meta_tensors(), extra=Payload())
  path = write_meta(tmp_path / "meta", {0: tensors})
  with pytest.raises(ValueError, match="Refusing to load .*consolidated.00.pth"):
    load_checkpoint(path)
  assert not marker.exists()


def test_meta_quantized_tensor_is_named(tmp_path):
  tensors = meta_tensors()
  tensors["layers.0.feed_forward.w1.weight"] = tensors["layers.0.feed_forward.w1.weight"].to(
    torch.float8_e4m3fn
  )
  with pytest.raises(
    ValueError, match=r"'layers\.0\.feed_forward\.w1\.weight' is torch\.float8_e4m3fn"
  ):
    load_meta(write_meta(tmp_path / "meta", {0: tensors}))


def test_hf_save_refuses_a_used_directory(tmp_path):
  cfg, params = load_hf(write_hf(tmp_path / "hf", hf_tensors()))
  with pytest.raises(FileExistsError, match="non-empty directory"):
    save_hf(str(tmp_path / "hf"), cfg, params)


def test_hf_param_dtype_follows_stored_tensors(tmp_path):
  tensors = {name: t.astype(np.float16) for name, t in hf_tensors().items()}
  cfg, params = load_hf(write_hf(tmp_path / "hf", tensors))
  assert cfg.param_dtype == "float16" and params["embedding"].dtype == np.float16


LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
  "changes, named",
  [
    (dict(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (dict(hidden_size=None), "has no 'hidden_size', which is required"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps must be a finite number, got '1e-5'"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings must be true or false, got 'no'"),
    (
      dict(rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 8192}),
      " rope_scaling has no 'factor', which is required",
    ),
    (dict(num_key_value_heads=3), "ModelConfig.n_heads=4 is not divisible by n_kv_heads=3"),
  ],
)
def test_a_bad_hf_config_names_the_file_and_key(tmp_path, changes, named):
  path = write_hf(tmp_path / "hf", hf_tensors(), **changes)
  config_file = re.escape(os.path.join(path, "config.json"))
  with pytest.raises(ValueError, match=config_file + ".*" + re.escape(named)):
    load_checkpoint(path)


def test_config_files_that_are_not_json_objects_are_named(tmp_path):
  hf = write_hf(tmp_path / "hf", hf_tensors())
  with open(os.path.join(hf, "config.json"), "w") as f:
    f.write('{"hidden_size": 64,')
  config_file = re.escape(os.path.join(hf, "config.json"))
  with pytest.raises(ValueError, match=config_file + " is not valid JSON"):
    load_checkpoint(hf)
  meta = write_meta(tmp_path / "meta", {0: meta_tensors()}, params=[1, 2])
  with pytest.raises(ValueError, match="params.json holds a JSON list, not an object"):
    load_checkpoint(meta)


def test_a_bad_meta_config_names_the_file_and_key(tmp_path):
  path = write_meta(tmp_path / "meta", {0: meta_tensors()}, params={**PARAMS_JSON, "dim": "64"})
  params_file = re.escape(os.path.join(path, "params.json"))
  with pytest.raises(ValueError, match=params_file + ": dim must be a positive integer, got '64'"):
    load_checkpoint(path)


def test_tensors_the_config_does_not_use_are_an_error(tmp_path):
  tensors = hf_tensors()
  tensors.update({n.replace("layers.1.", "layers.2."): w for n, w in tensors.items() if ".1." in n})
  with pytest.raises(
    ValueError,
    match=r"has 9 tensors the config \(.*, 2 layers\) does not use, e\.g\. \['model\.layers\.2\.",
  ):
    load_checkpoint(write_hf(tmp_path / "more_layers", tensors))
  one_layer = {**PARAMS_JSON, "n_layers": 1}
  with pytest.raises(
    ValueError, match=r"1 layers\) does not use, e\.g\. \['layers\.1\.attention\."
  ):
    load_checkpoint(write_meta(tmp_path / "meta", {0: meta_tensors()}, params=one_layer))


def test_a_tied_head_must_equal_the_embedding(tmp_path):
  tensors = hf_tensors()
  with pytest.raises(ValueError, match="ties the output head to the embedding, but its lm_head"):
    load_checkpoint(write_hf(tmp_path / "distinct", tensors, tie_word_embeddings=True))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  cfg, params = load_checkpoint(write_hf(tmp_path / "same", tensors, tie_word_embeddings=True))
  assert cfg.tie_embeddings and "output" not in params
  del tensors["lm_head.weight"]
  cfg, _ = load_checkpoint(write_hf(tmp_path / "absent", tensors, tie_word_embeddings=True))
  assert cfg.tie_embeddings
