"""The experiment binaries end to end, as a user runs them, against the library called in-process."""

import os
import re
import subprocess
import sys

import jax
import numpy as np

import llama3_jax as l3
from llama3_jax.inference.quantize import quantize_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(binary, *flags, devices=1):
  xla_flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", binary), *flags],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _library_completion(cfg, params, prompt: str):
  """(tokenizer, the greedy 6-token completion of `prompt` by l3.generate in this process)."""
  tokenizer = l3.Tokenizer.default()
  [completion] = l3.generate(
    cfg,
    params,
    [tokenizer.encode(prompt, bos=True, eos=False)],
    max_new_tokens=6,
    stop_ids=tokenizer.stop_ids,
  )
  return tokenizer, completion


def test_generate_binary_greedy_completion_equals_library(tmp_path):
  cfg = l3.get_config("tiny")
  params = l3.init_params(cfg, jax.random.key(11))
  checkpoint = str(tmp_path / "tiny")
  l3.save_orbax(checkpoint, cfg, params)
  prompt = "Packed documents never attend across boundaries."
  tokenizer, expected = _library_completion(cfg, params, prompt)
  flags = (
    f"--checkpoint={checkpoint}",
    f"--prompt={prompt}",
    "--temperature=0",
    "--max_new_tokens=6",
  )
  # Share of the parameters and of the KV cache that one device holds: tensor=2 halves the weights
  # and kv heads; pipeline=2 x tensor=2 quarters the cache (layers in two stages) and the layer
  # weights, but tiny's parameters are mostly its embedding, split over tensor only.
  units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
  for mesh_flags, devices, held_shares in (
    ((), 1, None),
    (("--mesh=tensor=2",), 2, {"parameters": (0.45, 0.55), "KV cache": (0.45, 0.55)}),
    (("--mesh=pipeline=2,tensor=2",), 4, {"parameters": (0.4, 0.5), "KV cache": (0.24, 0.26)}),
  ):
    stdout = _run("generate.py", *flags, *mesh_flags, devices=devices)
    completion = stdout.split("--- completion")[1].split("\n", 1)[1].rsplit("\n---", 1)[0]
    assert completion == tokenizer.decode(expected)
    assert f"--- completion ({len(expected)} tokens)" in stdout
    held = re.findall(
      r"--- (parameters|KV cache).*: ([\d.]+) (\w+) per device of ([\d.]+) (\w+)", stdout
    )
    assert [h[0] for h in held] == list(held_shares or ())
    for what, part, part_unit, whole, whole_unit in held:
      share = float(part) * units[part_unit] / (float(whole) * units[whole_unit])
      low, high = held_shares[what]
      assert low < share < high, (mesh_flags, what, share)


def test_convert_binary_orbax_to_hf_keeps_every_tensor(tmp_path):
  cfg = l3.get_config("test-3.2")
  params = l3.init_params(cfg, jax.random.key(12))
  l3.save_orbax(str(tmp_path / "ours"), cfg, params)
  _run("convert.py", f"--checkpoint={tmp_path / 'ours'}", f"--output={tmp_path / 'hf'}", "--to=hf")
  loaded_cfg, loaded = l3.load_checkpoint(str(tmp_path / "hf"))
  # Hugging Face configs carry neither our preset name nor a compute dtype.
  assert loaded_cfg.replace(name=cfg.name, dtype=cfg.dtype) == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


def test_quantize_binary_writes_fbgemm_fp8_and_generate_quantizes_at_load_alike(tmp_path):
  """quantize.py writes our fp8 quantization in the fbgemm_fp8 layout (bit for bit); greedy
  tokens of that checkpoint (library) equal generate.py --quantize fp8 on the original."""
  cfg = l3.get_config("tiny", n_layers=3)
  params = l3.init_params(cfg, jax.random.key(13))
  l3.save_orbax(str(tmp_path / "ours"), cfg, params)
  out = tmp_path / "fp8"
  _run("quantize.py", f"--checkpoint={tmp_path / 'ours'}", f"--output={out}", "--to=hf")
  fp8_cfg, loaded = l3.load_checkpoint(str(out), dtype=cfg.dtype)
  _, expected_params = quantize_params(cfg, params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected_params), loaded)
  prompt = "Row-wise scales keep outliers apart."
  tokenizer, expected = _library_completion(fp8_cfg, loaded, prompt)
  stdout = _run(
    "generate.py",
    f"--checkpoint={tmp_path / 'ours'}",
    "--quantize=fp8",
    f"--prompt={prompt}",
    "--temperature=0",
    "--max_new_tokens=6",
  )
  completion = stdout.split("--- completion")[1].split("\n", 1)[1].rsplit("\n---", 1)[0]
  assert completion == tokenizer.decode(expected)
