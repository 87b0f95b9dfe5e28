"""KV-cache decoding and packed documents against full, single-document forward passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama3_jax as l3
from llama3_jax.inference import decode_step, prefill
from llama3_jax.model import KVCache, unrolled_layers
from llama3_jax.model.attention import write_in_place

IMPLS = ["xla", "dot_product", "flash"]
# Tiles of 4 tokens: prompts, documents and cache slots span several, some of them skipped.
FLASH_BLOCKS = dict(attention_block_q=4, attention_block_kv=4)


def _model(name, impl, seed=0):
  cfg = l3.get_config(name, attention_impl=impl, **(FLASH_BLOCKS if impl == "flash" else {}))
  return cfg, l3.init_params(cfg, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
  return l3.Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def _full_logits(cfg, params, tokens, positions=None):
  """[T, V] logits of one unpacked sequence."""
  positions = None if positions is None else jnp.asarray([positions])
  return np.asarray(_forward(cfg, params, jnp.asarray([tokens]), positions)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_cache_decoding_equals_full_forward_at_every_step(impl):
  cfg, params = _model("test-3.1", impl)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (7, 3)]
  continuation = rng.randint(0, cfg.vocab_size, (2, 6))
  tokens = np.zeros((2, 7), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, : len(prompt)] = prompt
  lengths = jnp.asarray([7, 3], jnp.int32)
  cache = KVCache.empty(cfg, 2, 7 + continuation.shape[1])
  step_logits, cache = jax.jit(prefill, static_argnums=0)(
    cfg, params, jnp.asarray(tokens), lengths, cache
  )
  decode = jax.jit(decode_step, static_argnums=0)
  # The model is causal, so one forward pass over each whole sequence gives every step's logits.
  full = [
    _full_logits(cfg, params, prompt + continuation[row].tolist())
    for row, prompt in enumerate(prompts)
  ]
  for step in range(continuation.shape[1] + 1):
    for row, prompt in enumerate(prompts):
      expected = full[row][len(prompt) + step - 1]
      np.testing.assert_allclose(np.asarray(step_logits[row]), expected, atol=1e-5, rtol=0)
    if step < continuation.shape[1]:
      step_logits, cache = decode(
        cfg, params, jnp.asarray(continuation[:, step]), lengths + step, cache
      )


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents_see_only_themselves(impl):
  cfg, params = _model("test-3.2", impl, seed=1)
  rng = np.random.RandomState(1)
  documents = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (9, 4, 12)]
  row_length = 32
  tokens = np.zeros(row_length, np.int32)
  positions = np.zeros(row_length, np.int32)
  segment_ids = np.zeros(row_length, np.int32)
  start = 0
  for segment, doc in enumerate(documents, start=1):
    tokens[start : start + len(doc)] = doc
    positions[start : start + len(doc)] = np.arange(len(doc))
    segment_ids[start : start + len(doc)] = segment
    start += len(doc)
  packed = np.asarray(
    _forward(
      cfg,
      params,
      jnp.asarray(tokens[None]),
      jnp.asarray(positions[None]),
      jnp.asarray(segment_ids[None]),
    )[0]
  )
  start = 0
  for doc in documents:
    np.testing.assert_allclose(
      packed[start : start + len(doc)], _full_logits(cfg, params, doc), atol=1e-5, rtol=0
    )
    start += len(doc)


def test_positions_drive_rope_not_slot_order():
  """A document at positions 1000.. gives the same logits alone or after another packed document."""
  cfg, params = _model("test-3.1", "xla", seed=2)
  doc = np.random.RandomState(2).randint(0, cfg.vocab_size, 8)
  alone = _full_logits(cfg, params, doc.tolist(), positions=np.arange(1000, 1008).tolist())
  tokens = np.concatenate([doc[:5], doc])[None]
  positions = np.concatenate([np.arange(5), np.arange(1000, 1008)])[None]
  segment_ids = np.array([[1] * 5 + [2] * 8])
  packed = np.asarray(
    _forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))[0]
  )
  np.testing.assert_allclose(packed[5:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_loss_and_gradients(policy):
  cfg, params = _model("test-3.0", "xla", seed=3)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 16)))

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(l3.Transformer(c).apply({"params": p}, tokens)) ** 2)

  loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain_loss, plain_grads = loss_and_grads(params, cfg)
  remat_loss, remat_grads = loss_and_grads(params, cfg.replace(remat_policy=policy))
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), remat_grads, plain_grads
  )


def test_cache_without_positions_continues_from_cache_index():
  cfg, params = _model("test-3.1", "xla", seed=5)
  tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (1, 10))
  model = l3.Transformer(cfg)
  cache = KVCache.empty(cfg, 1, 10)
  _, cache = model.apply({"params": params}, jnp.asarray(tokens[:, :6]), cache=cache)
  chunk_logits, cache = model.apply({"params": params}, jnp.asarray(tokens[:, 6:]), cache=cache)
  np.testing.assert_allclose(
    np.asarray(chunk_logits[0]),
    _full_logits(cfg, params, tokens[0].tolist())[6:],
    atol=1e-5,
    rtol=0,
  )
  assert int(cache.index) == 10


def test_logits_at_gives_full_logits_at_that_index():
  cfg, params = _model("test-3.2", "xla", seed=6)
  tokens = np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 9))
  full = np.asarray(_forward(cfg, params, jnp.asarray(tokens)))
  picked = l3.Transformer(cfg).apply(
    {"params": params}, jnp.asarray(tokens), logits_at=jnp.array([8, 3])
  )
  np.testing.assert_allclose(np.asarray(picked), full[[0, 1], [8, 3]], atol=1e-6, rtol=0)


def test_more_tokens_than_cache_slots_is_an_error():
  cfg, params = _model("test-3.0", "xla")
  with pytest.raises(ValueError, match="5 tokens do not fit a KV cache of 4 slots"):
    l3.Transformer(cfg).apply(
      {"params": params}, jnp.zeros((1, 5), jnp.int32), cache=KVCache.empty(cfg, 1, 4)
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_runner_of_sliced_layers_equals_the_layer_scan(dtype):
  """A decode step through `unrolled_layers` (what the decode loop runs) gives the layer scan's
  logits and cache to the dtype's rounding (XLA fuses the two differently), in float32 and in
  bfloat16 (whose cache writes go through the 16-bit integer path of `write_in_place`), for the
  fp8 model's three layer stacks too."""
  atol = {"float32": 1e-6, "bfloat16": 1e-2}[dtype]  # bfloat16: a few ulps at |logit| ~0.5
  for quantization in (None, "fp8"):
    cfg = l3.get_config("test-3.1", dtype=dtype, n_layers=3, quantization=quantization)
    params = l3.init_params(cfg, jax.random.key(8))
    tokens = jnp.asarray([[5, 17, 300, 42], [77, 3, 0, 0]])
    cache = KVCache.empty(cfg, 2, 8)
    _, cache = jax.jit(prefill, static_argnums=0)(cfg, params, tokens, jnp.asarray([4, 2]), cache)
    step = jax.jit(decode_step, static_argnums=(0, 5))
    token, position = jnp.asarray([9, 11]), jnp.asarray([4, 2])
    scanned = step(cfg, params, token, position, cache, None)
    runner = unrolled_layers(cfg, params)
    unrolled = jax.jit(lambda p, c: decode_step(cfg, p, token, position, c, runner))(params, cache)
    close = lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol
    )
    jax.tree.map(close, unrolled, scanned)
    assert int(jnp.sum(scanned[1].segment_ids)) == 4 + 2 + 2  # the new slot written in each row


def test_write_in_place_equals_dynamic_update_slice_for_16_bit_floats():
  whole = jax.random.normal(jax.random.key(0), (3, 2, 8, 4), jnp.bfloat16)
  update = jnp.asarray([[[[jnp.inf, -0.0, 1e-40, jnp.nan]]] * 2], jnp.bfloat16)
  expected = jax.lax.dynamic_update_slice(whole, update, (1, 0, 5, 0))
  got = jax.jit(write_in_place)(whole, update, (1, 0, 5, 0))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    jax.lax.bitcast_convert_type(got, jnp.uint16),
    jax.lax.bitcast_convert_type(expected, jnp.uint16),
  )
