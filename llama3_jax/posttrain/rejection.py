"""Rejection sampling (Llama 3 paper Sec. 4.2.2): K responses per prompt, the prompt prefilled
once and its KV cache shared by the K samples, each scored by the reward model; the best kept
(and the worst, as a DPO pair). Generation and scoring run on a Layout's mesh when given one
(its context degree for the prefill, its batch shards for the scoring)."""

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.config import ModelConfig, SamplingConfig
from llama3_jax.inference.generate import (
  NOT_GENERATED,
  decode_tokens,
  pad_prompts,
  padded_length,
  prefill,
)
from llama3_jax.model import KVCache
from llama3_jax.parallel.layout import Layout
from llama3_jax.posttrain.reward import RewardModel
from llama3_jax.tokenizer.chat_format import ChatFormat, Message


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "samples", "max_new_tokens", "sampling", "stop_ids", "context_degree"),
)
def sample_from_one_prefill(
  params,
  prompt_1P,
  length_1,
  rng,
  *,
  cfg,
  samples,
  max_new_tokens,
  sampling,
  stop_ids,
  context_degree=1,
):
  """[samples, max_new_tokens] int32 responses to one prompt [1, P] (right-padded to P, `length_1`
  real tokens): one prefill (split over `context_degree` context ranks), its cache and last
  logits repeated for the samples, which then decode independently (NOT_GENERATED after a stop
  token)."""
  cache = KVCache.empty(cfg, 1, prompt_1P.shape[1] + max_new_tokens - 1)
  logits_1V, cache = prefill(cfg, params, prompt_1P, length_1, cache, context_degree)
  shared = KVCache(
    k=jnp.repeat(cache.k, samples, axis=1),
    v=jnp.repeat(cache.v, samples, axis=1),
    positions=jnp.repeat(cache.positions, samples, axis=0),
    segment_ids=jnp.repeat(cache.segment_ids, samples, axis=0),
    index=cache.index,
  )
  return decode_tokens(
    cfg,
    params,
    jnp.repeat(logits_1V, samples, axis=0),
    shared,
    jnp.repeat(length_1, samples),
    rng,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stop_ids,
  )


@dataclasses.dataclass(frozen=True)
class Scored:
  """A sampled response: its text, its token ids (the end token included) and its reward."""

  text: str
  ids: List[int]
  reward: float


def _response_ids(row: np.ndarray, stop_ids: Sequence[int], eot_id: int) -> List[int]:
  """A sampled row up to and including its stop token (eot appended if it ran out of tokens)."""
  ids = []
  for token in row.tolist():
    if token == NOT_GENERATED:
      break
    ids.append(token)
    if token in stop_ids:
      return ids
  return ids + [eot_id]


def rejection_sample(
  chat: ChatFormat,
  cfg: ModelConfig,
  params: Dict,
  reward_cfg: ModelConfig,
  reward_params: Dict,
  prompt: Sequence[Message],
  *,
  samples: int,
  max_new_tokens: int,
  sampling: SamplingConfig,
  rng: jax.Array,
  layout: Optional[Layout] = None,
) -> List[Scored]:
  """`samples` responses to the dialog `prompt`, scored by the reward model, best first; on
  `layout`'s mesh (its context degree for the prefill, its batch shards for the scoring) when
  given, else on one device."""
  tokenizer = chat.tokenizer
  prompt_ids = chat.encode_dialog_prompt(prompt)
  limit = cfg.max_seq_len - max_new_tokens + 1
  context_degree = layout.context_degree if layout else 1
  tokens, lengths = pad_prompts(
    [prompt_ids], padded_length(len(prompt_ids), limit, 16 * context_degree)
  )
  stops = tuple(sorted(tokenizer.stop_ids))
  rows = sample_from_one_prefill(
    params,
    jnp.asarray(tokens),
    jnp.asarray(lengths),
    rng,
    cfg=cfg,
    samples=samples,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stops,
    context_degree=context_degree,
  )
  responses = [_response_ids(row, stops, tokenizer.eot_id) for row in np.asarray(rows)]
  shards = layout.batch_degree if layout else 1
  rewards = score_responses(reward_cfg, reward_params, prompt_ids, responses, shards)
  scored = [
    Scored(tokenizer.decode([t for t in ids if t not in stops]), ids, float(r))
    for ids, r in zip(responses, rewards)
  ]
  return sorted(scored, key=lambda s: -s.reward)


@functools.partial(jax.jit, static_argnums=0)
def _rewards(reward_cfg: ModelConfig, reward_params, tokens_BT, positions_BT, segment_ids_BT):
  return RewardModel(reward_cfg).apply(
    {"params": reward_params}, tokens_BT, positions_BT, segment_ids_BT
  )


def score_responses(
  reward_cfg: ModelConfig,
  reward_params: Dict,
  prompt_ids: Sequence[int],
  responses,
  batch_shards: int = 1,
) -> np.ndarray:
  """float32 [len(responses)]: each response's reward after the prompt, at its last token; one
  row per response (padded to a multiple of `batch_shards`, the mesh's batch degree)."""
  rows = [list(prompt_ids) + list(r) for r in responses]
  rows += [[]] * (-len(rows) % batch_shards)
  longest = max(len(r) for r in rows)
  tokens, lengths = pad_prompts(rows, padded_length(longest, max(longest, reward_cfg.max_seq_len)))
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  segment_ids = (positions < lengths[:, None]).astype(np.int32)
  rewards = _rewards(reward_cfg, reward_params, tokens, positions, segment_ids)
  return np.asarray(rewards)[np.arange(len(responses)), lengths[: len(responses)] - 1]
