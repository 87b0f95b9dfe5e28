"""Batched generation with a KV cache: one jitted prefill over the prompts, then a jitted decode loop."""

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama3_jax.config import ModelConfig
from llama3_jax.inference.sampling import SamplingConfig, sample
from llama3_jax.model import KVCache, Transformer, unrolled_layers
from llama3_jax.parallel.context import load_balanced_order, reorder_for_context
from llama3_jax.parallel.pipeline import PipelineSchedule
from llama3_jax.parallel.pipeline_decode import check_pipeline_model, pipelined_layers
from llama3_jax.parallel.sharding import mesh_context

NOT_GENERATED = -1


def check_token_ids(ids, what: str, vocab_size: int) -> np.ndarray:
  """`ids` as a 1-D integer array; ValueError naming `what` when they are not integers (floats are
  refused, not truncated) or fall outside the vocabulary."""
  ids = np.asarray(ids)
  if ids.size and (
    ids.ndim != 1 or ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer)
  ):
    raise ValueError(
      f"{what} must be a sequence of integer token ids, got {ids.dtype} values of shape {ids.shape}"
    )
  bad = ids[(ids < 0) | (ids >= vocab_size)] if ids.size else ids
  if bad.size:
    raise ValueError(
      f"{what} has token ids {sorted(set(bad.tolist()))[:10]} outside the vocabulary "
      f"[0, {vocab_size})"
    )
  return ids.astype(np.int64)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
  """Raises ValueError for an empty batch, an empty prompt or bad token ids (`check_token_ids`)."""
  if not prompts:
    raise ValueError("generate needs at least one prompt")
  for row, prompt in enumerate(prompts):
    if np.size(prompt) == 0:
      raise ValueError(f"Prompt {row} is empty")
    check_token_ids(prompt, f"Prompt {row}", vocab_size)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Right-padded [B, length] int32 tokens and [B] int32 lengths."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, : len(prompt)] = prompt
  return tokens, lengths


def padded_length(longest: int, limit: int, multiple: int = 16) -> int:
  """Prompt slots for a longest prompt of `longest` tokens, a multiple of `multiple` (what context
  parallelism splits): the next power of two (at least 16; few distinct compiles) when it is at
  most `limit` and such a multiple, else `longest` rounded up to one."""
  power = max(16, 1 << (longest - 1).bit_length())
  if power <= limit and power % multiple == 0:
    return power
  return -(-longest // multiple) * multiple


def prompt_slots(
  cfg: ModelConfig, longest: int, max_new_tokens: int, context_degree: int = 1
) -> int:
  """The padded prompt length `generate` uses for a longest prompt of `longest` tokens (its cache
  holds this + max_new_tokens - 1 slots)."""
  limit = cfg.max_seq_len - max_new_tokens + 1
  return padded_length(longest, limit, 16 * context_degree)


def layer_runner(cfg: ModelConfig, params: Dict, pipeline: Optional[PipelineSchedule]):
  """The Transformer's `run_layers` for `pipeline` stages (None: the layers as they are)."""
  return None if pipeline is None else pipelined_layers(cfg, params["layers"], pipeline)


def decode_runner(cfg: ModelConfig, params: Dict, pipeline: Optional[PipelineSchedule]):
  """The `run_layers` of a decode loop, built once before it: `pipeline` stages, else the layers
  one by one from weights sliced once (`unrolled_layers`)."""
  return layer_runner(cfg, params, pipeline) or unrolled_layers(cfg, params)


def prefill(
  cfg: ModelConfig,
  params: Dict,
  tokens_BP,
  lengths_B,
  cache: KVCache,
  context_degree: int = 1,
  pipeline: Optional[PipelineSchedule] = None,
):
  """Runs right-padded prompts through the model: (logits at each row's last token [B, V], cache).
  With a `pipeline` schedule the layers run in its stages over `pipeline` (B a multiple of its
  micro-batches, parallel/pipeline_decode.py).

  With `context_degree` > 1 (the `context` degree of the mesh it runs on, e.g. a Layout's) the
  prompt is put in the load-balanced order of parallel/context.py, to be split over `context`: the
  cache slots then hold the prompt in that order, which attention does not see (it masks by the
  positions stored with each slot)."""
  batch, length = tokens_BP.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  segment_ids = (positions < lengths_B[:, None]).astype(jnp.int32)
  last = lengths_B - 1
  if context_degree > 1:
    order = load_balanced_order(length, context_degree)
    tokens_BP, positions, segment_ids = reorder_for_context(
      (tokens_BP, positions, segment_ids), context_degree
    )
    last = jnp.asarray(np.argsort(order), jnp.int32)[last]  # where each last token went
  return Transformer(cfg).apply(
    {"params": params},
    tokens_BP,
    positions,
    segment_ids,
    cache=cache,
    logits_at=last,
    run_layers=layer_runner(cfg, params, pipeline),
  )


def decode_step(
  cfg: ModelConfig, params: Dict, token_B, position_B, cache: KVCache, run_layers=None
):
  """One token per row at its own position: (logits [B, V], cache). `run_layers`: the
  Transformer's (e.g. `decode_runner`'s)."""
  logits_B1V, cache = Transformer(cfg).apply(
    {"params": params},
    token_B[:, None],
    position_B[:, None],
    jnp.ones_like(token_B)[:, None],
    cache=cache,
    run_layers=run_layers,
  )
  return logits_B1V[:, 0], cache


def decode_tokens(
  cfg: ModelConfig,
  params,
  logits_BV,
  cache: KVCache,
  lengths_B,
  rng,
  *,
  max_new_tokens: int,
  sampling: SamplingConfig,
  stop_ids: Tuple[int, ...],
  pipeline: Optional[PipelineSchedule] = None,
):
  """[B, max_new_tokens] int32 new tokens after a prefill that left `logits_BV` (at each row's last
  prompt token) and `cache`; after a row's stop token (kept) it holds NOT_GENERATED. `pipeline`:
  see `prefill`."""
  batch = logits_BV.shape[0]
  rng, first_rng = jax.random.split(rng)
  stop_ids = jnp.asarray(stop_ids, jnp.int32)
  first_B = sample(logits_BV, first_rng, sampling)
  out_BN = jnp.full((batch, max_new_tokens), NOT_GENERATED, jnp.int32).at[:, 0].set(first_B)
  run_layers = decode_runner(cfg, params, pipeline)

  def keep_going(state):
    step, _, done, _, _, _ = state
    return (step + 1 < max_new_tokens) & ~jnp.all(done)

  def next_token(state):
    step, token_B, done, out_BN, cache, rng = state
    logits_BV, cache = decode_step(
      cfg, params, token_B, lengths_B + step, cache.constrained(), run_layers
    )
    rng, step_rng = jax.random.split(rng)
    token_B = sample(logits_BV, step_rng, sampling)
    out_BN = out_BN.at[:, step + 1].set(jnp.where(done, NOT_GENERATED, token_B))
    return step + 1, token_B, done | jnp.isin(token_B, stop_ids), out_BN, cache, rng

  state = (jnp.int32(0), first_B, jnp.isin(first_B, stop_ids), out_BN, cache, rng)
  return jax.lax.while_loop(keep_going, next_token, state)[3]


def empty_cache(cfg: ModelConfig, batch: int, slots: int, mesh: Optional[Mesh] = None) -> KVCache:
  """An empty cache of `slots` slots per row, placed in its shards on `mesh` as generation holds it
  (KVCache.CACHE_KV_AXES)."""
  make = jax.jit(lambda: KVCache.empty(cfg, batch, slots).constrained())
  with mesh_context(mesh):
    return make()


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "max_new_tokens", "sampling", "stop_ids", "context_degree", "pipeline"),
)
def generate_tokens(
  params,
  tokens_BP,
  lengths_B,
  rng,
  *,
  cfg: ModelConfig,
  max_new_tokens: int,
  sampling: SamplingConfig,
  stop_ids: Tuple[int, ...],
  context_degree: int = 1,
  pipeline: Optional[PipelineSchedule] = None,
):
  """[B, max_new_tokens] int32 new tokens; after a row's stop token (kept) it holds NOT_GENERATED.
  `context_degree`, `pipeline`: see `prefill`."""
  batch, length = tokens_BP.shape
  cache = KVCache.empty(cfg, batch, length + max_new_tokens - 1).constrained()
  logits_BV, cache = prefill(cfg, params, tokens_BP, lengths_B, cache, context_degree, pipeline)
  return decode_tokens(
    cfg,
    params,
    logits_BV,
    cache,
    lengths_B,
    rng,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stop_ids,
    pipeline=pipeline,
  )


def generation_pipeline(cfg: ModelConfig, mesh: Optional[Mesh]) -> Optional[PipelineSchedule]:
  """The schedule `generate` runs on `mesh`: one stage per `pipeline` rank and as many
  micro-batches (every rank busy once the pipeline is full); None without pipeline ranks."""
  stages = mesh.shape["pipeline"] if mesh is not None else 1
  if stages == 1:
    return None
  schedule = PipelineSchedule(stages, micro_batches=stages)
  check_pipeline_model(cfg, schedule)
  return schedule


def generation_rows(rows: int, mesh: Optional[Mesh]) -> int:
  """The batch `generate` runs for `rows` prompts on `mesh`: a bucket (the next power of two up to
  8, then the next multiple of 8), so that batches of nearby sizes share one compile; with
  pipeline stages also a multiple of the micro-batches times the batch shards (`data` x `fsdp`),
  so every micro-batch splits evenly."""
  bucket = 1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8
  if mesh is None or mesh.shape["pipeline"] == 1:
    return bucket
  multiple = mesh.shape["pipeline"] * mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-bucket // multiple) * multiple


def generate(
  cfg: ModelConfig,
  params: Dict,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  stop_ids: Sequence[int] = (),
  rng: Optional[jax.Array] = None,
  mesh: Optional[Mesh] = None,
) -> List[List[int]]:
  """New tokens for each prompt, up to `max_new_tokens`, ending before the first stop token.

  On `mesh` (params placed in their shards, e.g. by `init_sharded_params` or `load_checkpoint(...,
  mesh=)`) the model runs under the mesh's logical rules: weights and KV cache in shards (kv
  heads over `tensor`), rows over `data` / `fsdp`, prompts prefilled with context parallelism
  over `context`, layers in stages over `pipeline` with micro-batched prefill and decode (paper
  Sec. 6.1); the tokens are those of one device. The batch is padded with copies of the last
  prompt to `generation_rows` (a bucket of sizes, and micro-batches that split evenly)."""
  context_degree = mesh.shape["context"] if mesh is not None else 1
  check_prompts(prompts, cfg.vocab_size)
  pipeline = generation_pipeline(cfg, mesh)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if sampling.top_k > cfg.vocab_size:
    raise ValueError(
      f"SamplingConfig.top_k={sampling.top_k} exceeds the vocabulary ({cfg.vocab_size})"
    )
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
      f"Longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
      f"model's max_seq_len {cfg.max_seq_len}"
    )
  rows = list(prompts) + [prompts[-1]] * (generation_rows(len(prompts), mesh) - len(prompts))
  tokens, lengths = pad_prompts(rows, prompt_slots(cfg, longest, max_new_tokens, context_degree))
  stops = sorted(set(check_token_ids(list(stop_ids), "stop_ids", cfg.vocab_size).tolist()))
  with mesh_context(mesh):
    out = np.asarray(
      generate_tokens(
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.random.key(0) if rng is None else rng,
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=tuple(stops),
        context_degree=context_degree,
        pipeline=pipeline,
      )
    )
  results = []
  for row in out[: len(prompts)]:
    kept = []
    for token in row.tolist():
      if token == NOT_GENERATED or token in stops:
        break
      kept.append(token)
    results.append(kept)
  return results
