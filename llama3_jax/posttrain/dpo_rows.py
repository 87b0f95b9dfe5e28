"""DPO's rows: a prompt with its chosen and rejected responses in one row, scored in one forward.

The two responses are branches after the prompt (see `Transformer`): each attends to the prompt
and itself only, with positions continuing from the prompt. A token is predicted from the logits
of the token before it in its own sequence, which for the rejected response's first token is the
prompt's last token (`predicted_from`). The masks hold each response's content only: its header
belongs to the prompt, and its end token (eot / eom) is masked, as the paper masks formatting
tokens.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.config import DPOConfig, ModelConfig, TrainConfig
from llama3_jax.data.chat import Preference
from llama3_jax.model import Transformer
from llama3_jax.parallel import mesh_context
from llama3_jax.posttrain.dpo import dpo_loss, response_sums
from llama3_jax.posttrain.reward import pack_responses
from llama3_jax.tokenizer.chat_format import ChatFormat
from llama3_jax.train.loss import chunked_log_probs


def dpo_rows(chat: ChatFormat, preferences: Sequence[Preference], length: int) -> Dict:
  """int32 [N, length] `tokens`, `positions`, `segment_ids`, `branch_ids`, `predicted_from`, and
  bool `chosen` / `rejected` masks. Chosen is the best response (edited if given), rejected the
  worst."""
  header = len(chat.encode_header("assistant"))
  rows = []
  for preference in preferences:
    prompt = chat.encode_dialog_prompt(preference.prompt)
    chosen, rejected = (
      chat.encode_message(m)[header:] for m in (preference.ranked[0], preference.ranked[-1])
    )
    row, _ = pack_responses(prompt, [chosen, rejected], length)
    predicted_from = np.maximum(np.arange(length) - 1, 0)
    second = len(prompt) + len(chosen)
    predicted_from[second] = len(prompt) - 1
    for name, start, size in (
      ("chosen", len(prompt), len(chosen)),
      ("rejected", second, len(rejected)),
    ):
      row[name] = np.zeros(length, bool)
      row[name][start : start + size - 1] = True  # content, not the end token
    row["predicted_from"] = predicted_from.astype(np.int32)
    rows.append(row)
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def response_logps(params: Dict, batch: Dict, cfg: ModelConfig, chunk=TrainConfig.loss_chunk):
  """(chosen log-prob sums [B], rejected log-prob sums [B], chosen token counts [B]), float32;
  the head runs over `chunk` tokens at a time, response tokens only (train/loss.py)."""
  model = Transformer(cfg)
  hidden_BTD = model.apply(
    {"params": params},
    batch["tokens"],
    batch["positions"],
    batch["segment_ids"],
    batch["branch_ids"],
    method="hidden",
  )
  predicting_BTD = jnp.take_along_axis(hidden_BTD, batch["predicted_from"][..., None], axis=1)
  head = lambda x: model.apply({"params": params}, x, method="head")
  responses_BT = batch["chosen"] | batch["rejected"]
  logps_BT, _ = chunked_log_probs(
    head, predicting_BTD, batch["tokens"], chunk, valid_BT=responses_BT
  )
  chosen, chosen_tokens = response_sums(logps_BT, batch["chosen"])
  rejected, _ = response_sums(logps_BT, batch["rejected"])
  return chosen, rejected, chosen_tokens


def dpo_objective(
  params: Dict, batch: Dict, cfg: ModelConfig, dpo_cfg: DPOConfig, reference_params=None
):
  """(DPO loss, metrics) of a batch of `dpo_rows`: the reference's log-probs from the batch
  (`ref_chosen`, `ref_rejected`, precomputed) or from `reference_params` (frozen, computed here)."""
  chosen, rejected, chosen_tokens = response_logps(params, batch, cfg)
  if reference_params is None:
    ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
  else:
    ref_chosen, ref_rejected, _ = jax.lax.stop_gradient(
      response_logps(reference_params, batch, cfg)
    )
  return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, dpo_cfg, -chosen, chosen_tokens)


def with_reference_logps(rows: Dict, params: Dict, cfg: ModelConfig, mesh, size: int) -> Dict:
  """`rows` plus `ref_chosen` / `ref_rejected` [N]: the frozen reference's (`params`, placed on
  `mesh`) response log-probs of every row, `size` rows per pass (the last pass padded with copies
  of its rows, their results dropped)."""
  score = jax.jit(lambda p, batch: response_logps(p, batch, cfg)[:2])
  count, sums = len(rows["tokens"]), []
  with mesh_context(mesh):
    for start in range(0, count, size):
      kept = min(size, count - start)
      take = start + np.arange(size) % kept
      chosen, rejected = jax.device_get(score(params, {k: v[take] for k, v in rows.items()}))
      sums.append((chosen[:kept], rejected[:kept]))
  ref_chosen, ref_rejected = (np.concatenate(parts) for parts in zip(*sums))
  return dict(rows, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
