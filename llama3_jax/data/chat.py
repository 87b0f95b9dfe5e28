"""Chat dialogs and preference pairs as token ids with the masks post-training needs.

A dialog is encoded exactly as `ChatFormat` does (<|begin_of_text|>, then every message with its
header and end token). Each token is labelled: assistant content (what the assistant wrote,
including <|python_tag|> and tool calls), an assistant end token (<|eot_id|> / <|eom_id|>), or
neither (other roles, and every header: the role text and its special tokens). SFT learns the
assistant's content and end tokens; DPO scores content only (the paper masks formatting tokens).
"""

import dataclasses
import json
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from llama3_jax.data.sources import MAX_ROW_BYTES, MalformedCounter
from llama3_jax.tokenizer.chat_format import ChatFormat, Message


@dataclasses.dataclass(frozen=True)
class EncodedDialog:
  """tokens: int32 [L]; content / end: bool [L] marking the assistant's content and end tokens."""

  tokens: np.ndarray
  content: np.ndarray
  end: np.ndarray

  @property
  def sft_targets(self) -> np.ndarray:
    """bool [L]: the tokens SFT learns to predict."""
    return self.content | self.end


def encode_dialog(chat: ChatFormat, messages: Sequence[Message], bos: bool = True) -> EncodedDialog:
  """The dialog's ids (as `ChatFormat.encode_message` writes each message) and their labels."""
  tokens: List[int] = [chat.tokenizer.bos_id] if bos else []
  content: List[bool] = [False] * len(tokens)
  end: List[bool] = [False] * len(tokens)
  for message in map(Message.from_dict, messages):
    ids = chat.encode_message(message)
    header = len(chat.encode_header(message.role))
    mine = message.role == "assistant"
    tokens.extend(ids)
    content.extend([False] * header + [mine] * (len(ids) - header - 1) + [False])
    end.extend([False] * (len(ids) - 1) + [mine])
  return EncodedDialog(
    np.asarray(tokens, np.int32), np.asarray(content, bool), np.asarray(end, bool)
  )


def _messages(value: Any, what: str) -> List[Message]:
  if not isinstance(value, list) or not value:
    raise ValueError(f"{what} must be a non-empty list of messages, got {value!r}")
  return [Message.from_dict(m) for m in value]


def _response(value: Any, what: str) -> Message:
  """A response: an assistant message object, a list of just that message (TRL's conversational
  layout), or its text."""
  if isinstance(value, str):
    return Message("assistant", value)
  if isinstance(value, list):
    if len(value) != 1:
      raise ValueError(f"{what} as a list must hold one assistant message, got {len(value)}")
    value = value[0]
  message = Message.from_dict(value)
  if message.role != "assistant":
    raise ValueError(f"{what} must be an assistant message, got role {message.role!r}")
  return message


def parse_prompt_row(row: Mapping[str, Any]) -> List[Message]:
  """{"prompt": [messages]} (or "messages") -> the prompt's messages."""
  messages = row.get("prompt", row.get("messages")) if isinstance(row, Mapping) else None
  if not isinstance(messages, list) or not messages:
    raise ValueError('A prompt row needs a non-empty "prompt" (or "messages") list')
  return _messages(messages, "the prompt")


def parse_sft_row(row: Mapping[str, Any]) -> List[Message]:
  """{"messages": [...]} -> messages, of which at least one is the assistant's."""
  if not isinstance(row, Mapping) or "messages" not in row:
    raise ValueError(f"An SFT row needs a 'messages' list, got {row!r}")
  messages = _messages(row["messages"], "'messages'")
  if not any(m.role == "assistant" for m in messages):
    raise ValueError("An SFT dialog needs at least one assistant message to learn from")
  return messages


@dataclasses.dataclass(frozen=True)
class Preference:
  """A prompt and its responses ranked best first: (edited,) chosen, rejected."""

  prompt: List[Message]
  ranked: List[Message]


def ranked_pairs(n_responses: int) -> List[tuple]:
  """Every (better, worse) index pair a ranking best first implies: edited > chosen > rejected
  gives (0, 1), (0, 2), (1, 2)."""
  return [(i, j) for i in range(n_responses) for j in range(i + 1, n_responses)]


def _implicit_prompt(row: Mapping[str, Any]) -> Mapping[str, Any]:
  """TRL's implicit-prompt layout (`chosen` and `rejected` whole dialogs, the prompt their common
  messages) as a row with a `prompt`; any other row as it is."""
  dialogs = [row.get(k) for k in ("chosen", "rejected")]
  if "prompt" in row or not all(isinstance(d, list) and len(d) > 1 for d in dialogs):
    return row
  shared = 0
  while shared < min(map(len, dialogs)) and dialogs[0][shared] == dialogs[1][shared]:
    shared += 1
  return {
    **row,
    "prompt": dialogs[0][:shared],
    **{k: d[shared:] for k, d in zip(("chosen", "rejected"), dialogs)},
  }


def parse_preference_row(row: Mapping[str, Any]) -> Preference:
  """{"prompt": [messages], "chosen": response, "rejected": response, "edited"?: response}; a
  response is an assistant message, a list of one (TRL's conversational layout) or its text.
  Without `prompt`, `chosen` and `rejected` may be whole dialogs that share it (TRL's implicit
  prompt)."""
  if not isinstance(row, Mapping):
    raise ValueError(f"A preference row must be an object, got {row!r}")
  row = _implicit_prompt(row)
  unknown = sorted(set(row) - {"prompt", "chosen", "rejected", "edited"})
  missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
  if unknown or missing:
    raise ValueError(f"Preference row: missing keys {missing}, unknown keys {unknown}")
  ranked = [_response(row[k], f"'{k}'") for k in ("edited", "chosen", "rejected") if k in row]
  return Preference(_messages(row["prompt"], "'prompt'"), ranked)


def read_jsonl(
  path: str, parse, skip_bad: bool = False, counter: Optional[MalformedCounter] = None
) -> Iterator:
  """`parse(row)` of every non-blank line of a JSONL file. A line that fails in any way (not
  UTF-8, not JSON, nested too deep, longer than MAX_ROW_BYTES, rejected by `parse`) is an error
  naming the file, the line (from 1) and the reason: a ValueError, or with `skip_bad` a warning
  and the line left out (counted in `counter`)."""
  skipped = 0
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        if len(line) > MAX_ROW_BYTES:
          raise ValueError(f"{len(line):,} bytes, over the {MAX_ROW_BYTES:,} a row may take")
        row = parse(json.loads(line.decode("utf-8")))
      except Exception as e:  # any failure of one row is that row's
        reason = "JSON nested too deep" if isinstance(e, RecursionError) else e
        message = f"{path}:{number}: {type(e).__name__}: {reason}"
        if not skip_bad:
          raise ValueError(message) from None
        skipped += 1
        if counter is not None:
          counter.add(path, f"{path}:{number}")
        logging.warning("Skipping bad row %s (%d skipped in this file)", message, skipped)
        continue
      yield row


def sft_example(chat: ChatFormat, messages: Sequence[Message], max_len: Optional[int] = None):
  """(tokens int32 [L], targets bool [L]): what SFT packing takes, cut to `max_len` tokens."""
  dialog = encode_dialog(chat, messages)
  return dialog.tokens[:max_len], dialog.sft_targets[:max_len]
