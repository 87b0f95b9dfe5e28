"""The reward model of the Llama 3 paper (Sec. 4.1.2): the language model's backbone with a scalar
head, trained with the Bradley-Terry loss -log sigmoid(r_better - r_worse) (no margin term) over
every pair a ranking implies (edited > chosen > rejected). A prompt and its responses share one row:
each response attends to the prompt and to itself only (branch ids, see `Transformer`) and is
scored at its last token, exactly as if it were in a row of its own. The module is
`llama3_jax.model.RewardModel`; its parameters' shapes, sharded creation (from a language model
too) and checks are `llama3_jax.model.spec.REWARD`.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.config import ModelConfig
from llama3_jax.data.chat import Preference, ranked_pairs
from llama3_jax.model import RewardModel
from llama3_jax.tokenizer.chat_format import ChatFormat


def pack_responses(prompt: Sequence[int], responses: Sequence[Sequence[int]], length: int):
  """One row holding the prompt then each response as its own branch.

  Returns int32 [length] `tokens`, `positions` (each response continues from the prompt's end),
  `segment_ids` (1, 0 = padding), `branch_ids` (0 prompt, k for response k, counted from 1), and
  `score_at` int32 [len(responses)]: the index of each response's last token.
  """
  used = len(prompt) + sum(len(r) for r in responses)
  if used > length:
    raise ValueError(f"A prompt and its responses take {used} tokens; the row holds {length}")
  if not prompt or not all(responses):
    raise ValueError("The prompt and every response need at least one token")
  row = {
    k: np.zeros(length, np.int32) for k in ("tokens", "positions", "segment_ids", "branch_ids")
  }
  row["tokens"][: len(prompt)] = prompt
  row["positions"][: len(prompt)] = np.arange(len(prompt))
  start, score_at = len(prompt), []
  for branch, response in enumerate(responses, start=1):
    end = start + len(response)
    row["tokens"][start:end] = response
    row["positions"][start:end] = len(prompt) + np.arange(len(response))
    row["branch_ids"][start:end] = branch
    score_at.append(end - 1)
    start = end
  row["segment_ids"][:start] = 1
  return row, np.asarray(score_at, np.int32)


def bradley_terry_loss(rewards_BN, n_responses_B):
  """(mean of -log sigmoid(r_i - r_j) over every implied pair, pairwise accuracy).

  rewards_BN: float32 [B, N], each row's responses ranked best first; n_responses_B: int [B],
  how many of the N are real (2 or more)."""
  n = rewards_BN.shape[1]
  better, worse = map(np.asarray, zip(*ranked_pairs(n)))
  valid_BP = worse[None, :] < n_responses_B[:, None]
  margin_BP = rewards_BN[:, better] - rewards_BN[:, worse]
  count = jnp.maximum(jnp.sum(valid_BP), 1)
  loss = -jnp.sum(jnp.where(valid_BP, jax.nn.log_sigmoid(margin_BP), 0.0)) / count
  accuracy = jnp.sum(valid_BP & (margin_BP > 0)) / count
  return loss, accuracy


def preference_rows(chat: ChatFormat, preferences: Sequence[Preference], length: int) -> Dict:
  """Rows for the reward model, one per preference: int32 [N, length] `tokens`, `positions`,
  `segment_ids`, `branch_ids`; `score_at` int32 [N, R] (R = the most responses of a row; missing
  ones point at 0) and `n_responses` int32 [N]. The prompt ends with the assistant's header; each
  response is the assistant's content and end token."""
  header = len(chat.encode_header("assistant"))
  most = max(len(p.ranked) for p in preferences)
  rows, score_at = [], np.zeros((len(preferences), most), np.int32)
  for i, preference in enumerate(preferences):
    responses = [chat.encode_message(m)[header:] for m in preference.ranked]
    row, at = pack_responses(chat.encode_dialog_prompt(preference.prompt), responses, length)
    rows.append(row)
    score_at[i, : len(at)] = at
  batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
  batch["score_at"] = score_at
  batch["n_responses"] = np.array([len(p.ranked) for p in preferences], np.int32)
  return batch


def reward_loss(params: Dict, batch: Dict, cfg: ModelConfig):
  """(Bradley-Terry loss, {"accuracy"}) of a batch of `preference_rows`."""
  rewards_BT = RewardModel(cfg).apply(
    {"params": params},
    batch["tokens"],
    batch["positions"],
    batch["segment_ids"],
    batch["branch_ids"],
  )
  rewards_BN = jnp.take_along_axis(rewards_BT, batch["score_at"], axis=1)
  loss, accuracy = bradley_terry_loss(rewards_BN, batch["n_responses"])
  return loss, {"accuracy": accuracy}
