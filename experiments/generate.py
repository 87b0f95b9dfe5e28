"""Generates text from a Llama 3 checkpoint, or from a randomly initialised preset when none is given.

  python experiments/generate.py --config tiny --prompt "The capital of France is"
  python experiments/generate.py --checkpoint /ckpt/Llama3.1-8B-Instruct \
      --chat '[{"role": "user", "content": "Write a haiku about JAX."}]'
  python experiments/generate.py --checkpoint /ckpt/Llama3.1-70B-Instruct --mesh tensor=8 ...
  python experiments/generate.py --checkpoint /ckpt/Llama3.1-405B-Instruct --mesh pipeline=2,tensor=8 ...
  python experiments/generate.py --checkpoint /ckpt/Llama3.1-8B-Instruct --quantize fp8 ...
"""

import json
import os
import time

import cli
import jax
from absl import app, flags

import llama3_jax as l3
from llama3_jax.inference.generate import empty_cache, generation_rows, prompt_slots
from llama3_jax.parallel import make_mesh
from llama3_jax.parallel.sharding import bytes_per_device

cli.define("checkpoint", "preset", "model", "mesh", "quantize", "generation", "sampling")
FLAGS = flags.FLAGS
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Plain-text prompt (repeat for a batch).")
_CHAT = flags.DEFINE_string("chat", None, "A dialog as a JSON list of {role, content} messages.")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "tokenizer.model path (default: the checkpoint's, else llama-models')."
)


def _load_model():
  """(config, params, mesh): --checkpoint (or --config's random weights), quantized as --quantize
  asks, in their shards on --mesh when given (mesh None: on the default device)."""
  if not FLAGS.mesh:
    cfg, params = cli.quantized(*cli.load_model())
    return cfg, jax.device_put(params), None
  mesh = make_mesh(cli.mesh_config())
  cfg, params = cli.quantized(*cli.load_model(mesh), mesh)
  return cfg, params, mesh


def _print_memory(cfg, params, mesh, prompts):
  """Parameter and KV cache bytes held by one device of `mesh`, against the whole."""
  longest = max(len(p) for p in prompts)
  slots = prompt_slots(cfg, longest, FLAGS.max_new_tokens, mesh.shape["context"])
  slots += FLAGS.max_new_tokens - 1
  cache = empty_cache(cfg, generation_rows(len(prompts), mesh), slots, mesh)
  for what, tree in (("parameters", params), (f"KV cache ({slots} slots)", cache)):
    whole = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    print(f"--- {what}: {_size(bytes_per_device(tree))} per device of {_size(whole)}")


def _size(nbytes: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if nbytes >= scale:
      return f"{nbytes / scale:.1f} {unit}"
  return f"{nbytes / 2**10:.1f} KiB"


def _tokenizer():
  """--tokenizer, else the checkpoint's own tokenizer.model (Meta ships one), else llama-models'."""
  path = _TOKENIZER.value
  if not path and FLAGS.checkpoint:
    path = os.path.join(FLAGS.checkpoint, "tokenizer.model")
    path = path if os.path.isfile(path) else None
  return l3.Tokenizer.from_file(path) if path else l3.Tokenizer.default()


def _prompt_tokens(tokenizer):
  if _CHAT.value:
    messages = [l3.Message.from_dict(m) for m in json.loads(_CHAT.value)]
    return [l3.ChatFormat(tokenizer).encode_dialog_prompt(messages)]
  if not _PROMPTS.value:
    raise app.UsageError("Give --prompt (repeatable) or --chat")
  return [tokenizer.encode(p, bos=True, eos=False) for p in _PROMPTS.value]


def main(argv):
  del argv
  tokenizer = _tokenizer()
  cfg, params, mesh = _load_model()
  prompts = _prompt_tokens(tokenizer)
  if mesh is not None:
    _print_memory(cfg, params, mesh, prompts)
  sampling = cli.sampling_config()
  start = time.perf_counter()
  outputs = l3.generate(
    cfg,
    params,
    prompts,
    max_new_tokens=FLAGS.max_new_tokens,
    sampling=sampling,
    stop_ids=tokenizer.stop_ids,
    rng=jax.random.key(FLAGS.seed),
    mesh=mesh,
  )
  seconds = time.perf_counter() - start
  for prompt, output in zip(prompts, outputs):
    print(f"--- prompt ({len(prompt)} tokens)\n{tokenizer.decode(prompt)}")
    print(f"--- completion ({len(output)} tokens)\n{tokenizer.decode(output)}")
  total = sum(len(o) for o in outputs)
  print(
    f"--- {total} tokens in {seconds:.2f} s including compilation ({total / seconds:.1f} tokens/s)"
  )


if __name__ == "__main__":
  cli.run(main)
