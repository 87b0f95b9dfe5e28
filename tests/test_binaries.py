"""The experiment binaries end to end, as a user runs them, against the library called in-process."""

import os
import re
import subprocess
import sys

import jax
import numpy as np

import llama3_jax as l3

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


def test_generate_binary_greedy_completion_equals_library(tmp_path):
  cfg = l3.get_config("tiny")
  params = l3.init_params(cfg, jax.random.key(11))
  checkpoint = str(tmp_path / "tiny")
  l3.save_orbax(checkpoint, cfg, params)
  tokenizer = l3.Tokenizer.default()
  prompt = "Packed documents never attend across boundaries."
  [expected] = l3.generate(
    cfg,
    params,
    [tokenizer.encode(prompt, bos=True, eos=False)],
    max_new_tokens=6,
    stop_ids=tokenizer.stop_ids,
  )
  flags = (
    f"--checkpoint={checkpoint}",
    f"--prompt={prompt}",
    "--temperature=0",
    "--max_new_tokens=6",
  )
  for stdout in (
    _run("generate.py", *flags),
    _run("generate.py", *flags, "--mesh=tensor=2", devices=2),
  ):
    completion = stdout.split("--- completion")[1].split("\n", 1)[1].rsplit("\n---", 1)[0]
    assert completion == tokenizer.decode(expected)
    assert f"--- completion ({len(expected)} tokens)" in stdout
  held = re.findall(
    r"--- (parameters|KV cache).*: ([\d.]+) (\w+) per device of ([\d.]+) (\w+)", stdout
  )
  assert [h[0] for h in held] == ["parameters", "KV cache"]
  for _, part, part_unit, whole, whole_unit in held:  # tensor=2 halves the weights and kv heads
    assert part_unit == whole_unit and 0.45 < float(part) / float(whole) < 0.55


def test_convert_binary_orbax_to_hf_keeps_every_tensor(tmp_path):
  cfg = l3.get_config("test-3.2")
  params = l3.init_params(cfg, jax.random.key(12))
  l3.save_orbax(str(tmp_path / "ours"), cfg, params)
  _run("convert.py", f"--checkpoint={tmp_path / 'ours'}", f"--output={tmp_path / 'hf'}", "--to=hf")
  loaded_cfg, loaded = l3.load_checkpoint(str(tmp_path / "hf"))
  # Hugging Face configs carry neither our preset name nor a compute dtype.
  assert loaded_cfg.replace(name=cfg.name, dtype=cfg.dtype) == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
