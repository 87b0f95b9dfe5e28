"""Context parallelism: the load-balanced chunk order, equal causal work per rank, a sharded
forward pass and a long-prompt prefill equal to one device. (Training over context meshes:
test_sharded_training.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import DataConfig, MeshConfig, RunConfig, TrainConfig
from llama3_jax.inference.generate import pad_prompts, prefill
from llama3_jax.model import KVCache
from llama3_jax.model.masks import AttentionMask
from llama3_jax.parallel import (
  init_sharded_params,
  load_balanced_order,
  make_mesh,
  mesh_context,
  reorder_for_context,
)
from llama3_jax.train.loop import train

CFG = l3.get_config("test-3.1", n_heads=8, n_kv_heads=8, ffn_dim=256)


def test_order_gives_rank_r_chunks_r_and_its_mirror():
  np.testing.assert_array_equal(load_balanced_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  np.testing.assert_array_equal(load_balanced_order(8, 4), [0, 7, 1, 6, 2, 5, 3, 4])
  assert sorted(load_balanced_order(96, 3)) == list(range(96))
  with pytest.raises(ValueError, match="divisible by 2 x 4 = 8; got 12"):
    load_balanced_order(12, 4)


def _pairs_per_rank(order, degree):
  """Unmasked (query, key) pairs of each rank's queries for one causal document."""
  positions = jnp.asarray(order)[None]
  mask = np.asarray(AttentionMask.self_attention(positions, jnp.ones_like(positions)).dense())
  return mask[0].reshape(degree, -1, len(order)).sum(axis=(1, 2))


@pytest.mark.parametrize("degree", [2, 4])
def test_every_rank_does_the_same_causal_work(degree):
  length = 64
  balanced = _pairs_per_rank(load_balanced_order(length, degree), degree)
  assert balanced.sum() == length * (length + 1) // 2
  assert len(set(balanced.tolist())) == 1
  contiguous = _pairs_per_rank(np.arange(length), degree)
  assert contiguous[-1] > 2 * contiguous[0]  # what the reordering avoids


@pytest.mark.parametrize("layout", ["fsdp=4,context=2", "fsdp=2,context=4"])
def test_sharded_forward_equals_one_device(layout):
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, CFG.vocab_size, (4, 32)).astype(np.int32)
  # Documents of 5, 19 and 8 tokens: they cross the chunk boundaries of both degrees.
  segment_ids = np.repeat(np.array([1, 2, 3]), [5, 19, 8])[None].repeat(4, 0).astype(np.int32)
  positions = np.concatenate([np.arange(n) for n in (5, 19, 8)])[None].repeat(4, 0)
  params = l3.init_params(CFG, jax.random.key(0))
  expected = l3.Transformer(CFG).apply({"params": params}, tokens, positions, segment_ids)

  mesh = make_mesh(MeshConfig.parse(layout))
  degree = mesh.shape["context"]
  inputs = reorder_for_context((tokens, positions, segment_ids), degree)
  sharded_params = init_sharded_params(CFG, mesh, jax.random.key(0))
  with mesh_context(mesh):
    logits = jax.jit(l3.Transformer(CFG).apply)({"params": sharded_params}, *inputs)
  assert logits.sharding.spec[1] == "context"
  np.testing.assert_allclose(
    np.asarray(logits), np.asarray(reorder_for_context(expected, degree)), rtol=0, atol=1e-5
  )


def test_training_refuses_a_sequence_length_that_does_not_split():
  run = RunConfig(
    model=l3.get_config("tiny"),
    mesh=MeshConfig.parse("fsdp=2,context=4"),
    data=DataConfig(seq_len=20, global_batch_size=2),
    train=TrainConfig(steps=1),
  )
  with pytest.raises(ValueError, match="divisible by 2 x 4 = 8; got 20"):
    train(run, l3.Tokenizer.default())


# flash with tiles of 8 queries (2 per rank's chunk) and 16 cache slots.
PREFILL_CFGS = {
  "auto": CFG,
  "flash": CFG.replace(attention_impl="flash", attention_block_q=8, attention_block_kv=16),
}


@pytest.mark.parametrize("impl", list(PREFILL_CFGS))
def test_context_parallel_prefill_equals_one_device(impl):
  """A long-prompt prefill split over context=4: the same last-token logits and the same cache
  (its slots in the load-balanced order), and then the same greedy continuation."""
  cfg = PREFILL_CFGS[impl]
  rng = np.random.RandomState(1)
  prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (60, 45)]
  tokens, lengths = pad_prompts(prompts, 64)
  params = l3.init_params(cfg, jax.random.key(0))
  empty = KVCache.empty(cfg, 2, 72)
  run_prefill = jax.jit(prefill, static_argnums=0, static_argnames="context_degree")
  logits, cache = run_prefill(cfg, params, tokens, lengths, empty)
  greedy = l3.SamplingConfig(temperature=0.0)
  continuation = l3.generate(cfg, params, prompts, max_new_tokens=8, sampling=greedy)

  mesh = make_mesh(MeshConfig.parse("fsdp=2,context=4"))
  sharded_params = init_sharded_params(cfg, mesh, jax.random.key(0))
  with mesh_context(mesh):
    cp_logits, cp_cache = run_prefill(cfg, sharded_params, tokens, lengths, empty, context_degree=4)
  cp_continuation = l3.generate(
    cfg, sharded_params, prompts, max_new_tokens=8, sampling=greedy, mesh=mesh
  )
  np.testing.assert_allclose(np.asarray(cp_logits), np.asarray(logits), rtol=0, atol=1e-5)
  order = load_balanced_order(64, 4)
  for name in ("k", "v", "positions", "segment_ids"):
    slots = 2 if name in ("k", "v") else 1  # k, v: [layers, B, S, kv_heads, head_dim]
    expected = np.take(np.asarray(getattr(cache, name)), order, axis=slots)
    got = np.take(np.asarray(getattr(cp_cache, name)), np.arange(64), axis=slots)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)
  assert int(cp_cache.index) == 64
  assert cp_continuation == continuation
