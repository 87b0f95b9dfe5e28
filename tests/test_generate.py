"""Generation against a cache-free greedy reference, stop tokens, and sampling against closed forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.config import MeshConfig
from llama3_jax.inference import SamplingConfig, generate, sample
from llama3_jax.inference.generate import empty_cache, generate_tokens, generation_rows
from llama3_jax.parallel import init_sharded_params, make_mesh
from llama3_jax.parallel.sharding import bytes_per_device


@pytest.fixture(scope="module")
def model():
  cfg = l3.get_config("test-3.1")
  return cfg, l3.init_params(cfg, jax.random.key(4))


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(cfg, params, tokens_1T):
  return l3.Transformer(cfg).apply({"params": params}, tokens_1T)[0, -1]


def _greedy_without_cache(cfg, params, prompt, steps):
  sequence = list(prompt)
  for _ in range(steps):
    sequence.append(int(jnp.argmax(_last_logits(cfg, params, jnp.asarray([sequence])))))
  return sequence[len(prompt) :]


def test_greedy_batch_with_different_prompt_lengths_matches_uncached_greedy(model):
  cfg, params = model
  prompts = [[5, 17, 300, 42, 9, 11], [77], [400, 401, 402]]
  out = generate(cfg, params, prompts, max_new_tokens=6)
  assert out == [_greedy_without_cache(cfg, params, p, 6) for p in prompts]


def test_stops_before_first_stop_token_per_row(model):
  cfg, params = model
  prompts = [[5, 17, 300, 42, 9, 11], [77]]
  free = generate(cfg, params, prompts, max_new_tokens=6)
  stop = free[0][2]
  stopped = generate(cfg, params, prompts, max_new_tokens=6, stop_ids=[stop])
  for row in range(2):
    expected = free[row][: free[row].index(stop)] if stop in free[row] else free[row]
    assert stopped[row] == expected


def test_sampling_with_top_k_1_or_tiny_top_p_is_greedy(model):
  cfg, params = model
  prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
  greedy = generate(cfg, params, prompts, max_new_tokens=5)
  for sampling in (
    SamplingConfig(temperature=1.5, top_k=1),
    SamplingConfig(temperature=1.5, top_p=1e-6),
  ):
    assert (
      generate(cfg, params, prompts, max_new_tokens=5, sampling=sampling, rng=jax.random.key(7))
      == greedy
    )


def _frequencies(logits, sampling, n=40_000):
  logits_BV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  tokens = jax.jit(sample, static_argnums=2)(logits_BV, jax.random.key(0), sampling)
  return np.bincount(np.asarray(tokens), minlength=len(logits)) / n


PROBS = np.array([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
  "sampling,expected",
  [
    (SamplingConfig(temperature=1.0), PROBS),
    (SamplingConfig(temperature=0.5), PROBS**2 / np.sum(PROBS**2)),
    (SamplingConfig(temperature=1.0, top_k=2), np.array([0.625, 0.375, 0, 0])),
    (SamplingConfig(temperature=1.0, top_p=0.7), np.array([0.625, 0.375, 0, 0])),
    (SamplingConfig(temperature=1.0, top_p=0.9), np.array([0.5, 0.3, 0.15, 0]) / 0.95),
    # top-p applies to the top-k distribution renormalised: 0.625 >= 0.6 keeps one token.
    (SamplingConfig(temperature=1.0, top_k=2, top_p=0.6), np.array([1.0, 0, 0, 0])),
  ],
)
def test_sampling_frequencies_match_closed_form(sampling, expected):
  np.testing.assert_allclose(_frequencies(np.log(PROBS), sampling), expected, atol=0.01)


@pytest.mark.parametrize(
  "logits,sampling,expected",
  [
    ([1.0, 1.0, 0.0, 0.0], SamplingConfig(temperature=1.0, top_k=1), [1.0, 0, 0, 0]),
    ([0.0] * 8, SamplingConfig(temperature=1.0, top_p=0.5), [0.25] * 4 + [0.0] * 4),
  ],
)
def test_sampling_cuts_ties_by_rank(logits, sampling, expected):
  np.testing.assert_allclose(_frequencies(np.array(logits), sampling), expected, atol=0.01)


def test_generate_rejects_bad_input(model):
  cfg, params = model
  with pytest.raises(
    ValueError, match=r"Prompt 1 has token ids \[512\] outside the vocabulary \[0, 512\)"
  ):
    generate(cfg, params, [[1, 2], [3, 512]], max_new_tokens=2)
  with pytest.raises(ValueError, match="Prompt 0 is empty"):
    generate(cfg, params, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len 16"):
    generate(cfg.replace(max_seq_len=16), params, [[1] * 10], max_new_tokens=7)
  with pytest.raises(ValueError, match=r"top_k=513 exceeds the vocabulary \(512\)"):
    generate(
      cfg, params, [[1]], max_new_tokens=2, sampling=SamplingConfig(temperature=1.0, top_k=513)
    )
  with pytest.raises(ValueError, match="top_p must be in"):
    SamplingConfig(temperature=1.0, top_p=0.0)


def test_generation_on_a_tensor_parallel_mesh_gives_one_devices_tokens():
  """On fsdp=2 x tensor=4 fake devices: the same greedy tokens as one device, each device holding
  an eighth of the matmul weights and a quarter of the KV cache (kv heads over tensor, half the
  rows over fsdp)."""
  cfg = l3.get_config("test-3.1").replace(n_kv_heads=4)
  prompts = [[5, 17, 300, 42, 9, 11], [77], [400, 401, 402], [3, 1, 4, 1, 5]]
  expected = generate(cfg, l3.init_params(cfg, jax.random.key(6)), prompts, max_new_tokens=8)
  mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=4"))
  sharded = init_sharded_params(cfg, mesh, jax.random.key(6))
  assert generate(cfg, sharded, prompts, max_new_tokens=8, mesh=mesh) == expected
  whole = sum(x.nbytes for x in jax.tree_util.tree_leaves(sharded))
  assert bytes_per_device(sharded) < whole / 7  # all but the norm scales split 8 ways
  cache = empty_cache(cfg, len(prompts), 32, mesh)
  assert cache.k.sharding.shard_shape(cache.k.shape) == (cfg.n_layers, 2, 32, 1, cfg.head_dim)
  assert bytes_per_device((cache.k, cache.v)) == (cache.k.nbytes + cache.v.nbytes) // 8


def test_pipelined_generation_gives_one_devices_tokens_with_layers_and_cache_split_over_stages():
  """On pipeline=2 x fsdp=2 x tensor=2 fake devices (paper Sec. 6.1: layers in stages, prefill
  and decode micro-batched): the same greedy tokens as one device for 3 prompts (padded to the 4
  rows that split into 2 micro-batches over 2 batch shards); each device holds an eighth of the
  matmul weights and of the KV cache (its stage's layers, its kv heads, its rows)."""
  cfg = l3.get_config("test-3.1").replace(n_kv_heads=4, n_layers=4)
  prompts = [[5, 17, 300, 42, 9, 11], [77], [400, 401, 402]]
  expected = generate(cfg, l3.init_params(cfg, jax.random.key(7)), prompts, max_new_tokens=8)
  mesh = make_mesh(MeshConfig.parse("pipeline=2,fsdp=2,tensor=2"))
  sharded = init_sharded_params(cfg, mesh, jax.random.key(7))
  assert generate(cfg, sharded, prompts, max_new_tokens=8, mesh=mesh) == expected
  layer_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(sharded["layers"]))
  assert bytes_per_device(sharded["layers"]) < layer_bytes / 7  # all but the norm scales
  cache = empty_cache(cfg, 4, 32, mesh)
  assert cache.k.sharding.shard_shape(cache.k.shape) == (2, 2, 32, 2, cfg.head_dim)
  with pytest.raises(ValueError, match="3 layers do not split into 2 pipeline stages"):
    generate(cfg.replace(n_layers=3), sharded, prompts, max_new_tokens=2, mesh=mesh)
  fp8 = cfg.replace(quantization="fp8")
  with pytest.raises(ValueError, match="keeps its first and last layers apart"):
    generate(fp8, sharded, prompts, max_new_tokens=2, mesh=mesh)


def test_batches_of_nearby_sizes_share_one_compile_and_padding_rows_change_nothing(model):
  """3 and 4 prompts run as one bucket of 4 rows (one compile of generate_tokens); each prompt's
  tokens are those it gets alone."""
  cfg, params = model
  prompts = [[5, 17, 300], [77], [400, 401, 402], [3, 1, 4]]
  alone = [generate(cfg, params, [p], max_new_tokens=5) for p in prompts]
  compiled = generate_tokens._cache_size()
  assert generate(cfg, params, prompts[:3], max_new_tokens=5) == sum(alone[:3], [])
  assert generate(cfg, params, prompts, max_new_tokens=5) == sum(alone, [])
  assert generate_tokens._cache_size() == compiled + 1
  assert [generation_rows(n, None) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
