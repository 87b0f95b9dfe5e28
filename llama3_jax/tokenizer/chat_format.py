"""Llama 3 chat format: dialogs of messages to token ids, as Meta's `ChatFormat` does."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama3_jax.tokenizer.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython", "tool")
# Tool results are headed `ipython`; `tool` (Meta's RawMessage role) is an alias.
_HEADER_NAMES = {"tool": "ipython"}
STOP_REASONS = ("end_of_turn", "end_of_message")
# Builtin tools called as `NAME.call(query="...")`; code_interpreter calls are raw code.
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
CODE_INTERPRETER = "code_interpreter"


def _unknown_keys(d: Mapping[str, Any], known: Sequence[str], what: str) -> None:
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise ValueError(f"Unknown {what} keys {unknown}; expected some of {list(known)}")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """An assistant's call of a builtin or custom tool."""

  call_id: str
  tool_name: str
  arguments: dict[str, Any]

  def __post_init__(self):
    if self.tool_name in QUERY_TOOLS and "query" not in self.arguments:
      raise ValueError(f"Tool call {self.tool_name!r} needs a 'query' argument")
    if self.tool_name == CODE_INTERPRETER and "code" not in self.arguments:
      raise ValueError(f"Tool call {CODE_INTERPRETER!r} needs a 'code' argument")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ToolCall:
    """Builds a ToolCall from `{"call_id", "tool_name", "arguments"}`, or from the OpenAI / Hugging
    Face layout `{"id"?, "type": "function", "function": {"name", "arguments"}}` (arguments an
    object or its JSON text)."""
    if isinstance(d, Mapping) and "function" in d:
      _unknown_keys(d, ("id", "type", "function"), "tool call")
      function = d["function"]
      if not isinstance(function, Mapping) or "name" not in function:
        raise ValueError(f"Tool call 'function' must be an object with a 'name', got {function!r}")
      arguments = function.get("arguments", {})
      if isinstance(arguments, str):
        try:
          arguments = json.loads(arguments)
        except ValueError:
          raise ValueError(f"Tool call arguments are not JSON: {arguments!r}") from None
      d = {"call_id": d.get("id", ""), "tool_name": function["name"], "arguments": arguments}
    if not isinstance(d, Mapping):
      raise ValueError(f"A tool call must be an object, got {d!r}")
    fields = ("call_id", "tool_name", "arguments")
    _unknown_keys(d, fields, "tool call")
    missing = [name for name in fields if name not in d]
    if missing:
      raise ValueError(f"Tool call {dict(d)} is missing {missing}")
    if not isinstance(d["arguments"], Mapping):
      raise ValueError(f"Tool call 'arguments' must be an object, got {d['arguments']!r}")
    return cls(str(d["call_id"]), str(d["tool_name"]), dict(d["arguments"]))

  def to_text(self) -> str:
    """The text the assistant writes for this call (Meta's JSON tool prompt format)."""
    if self.tool_name in QUERY_TOOLS:
      return f'{self.tool_name}.call(query="{self.arguments["query"]}")'
    if self.tool_name == CODE_INTERPRETER:
      return self.arguments["code"]
    return json.dumps({"type": "function", "name": self.tool_name, "parameters": self.arguments})


@dataclasses.dataclass(frozen=True)
class Message:
  """One dialog turn. `ipython` messages carry tool results; only the assistant calls tools.

  stop_reason "end_of_turn" closes the message with <|eot_id|>; "end_of_message"
  (assistant only, a tool answer is expected) closes it with <|eom_id|>.
  """

  role: str
  content: str
  tool_calls: tuple[ToolCall, ...] = ()
  stop_reason: str = "end_of_turn"

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"Unknown message role {self.role!r}; expected one of {list(ROLES)}")
    if not isinstance(self.content, str):
      raise ValueError(f"Message content must be a str, got {type(self.content).__name__}")
    if self.stop_reason not in STOP_REASONS:
      raise ValueError(
        f"Unknown stop_reason {self.stop_reason!r}; expected one of {list(STOP_REASONS)}"
      )
    if self.role != "assistant" and (self.tool_calls or self.stop_reason != "end_of_turn"):
      raise ValueError(
        f"Only assistant messages take tool_calls or stop_reason='end_of_message' "
        f"(role {self.role!r})"
      )
    object.__setattr__(self, "tool_calls", tuple(self.tool_calls))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Message:
    """Builds a Message from JSON-like `{"role", "content", "tool_calls"?, "stop_reason"?}` (the
    chat layout of OpenAI and Hugging Face: `content` may be null beside `tool_calls`, and a tool
    result's `tool_call_id` and `name` are accepted, the Llama 3 format has no place for them)."""
    if isinstance(d, Message):
      return d
    if not isinstance(d, Mapping):
      raise ValueError(f"A message must be an object, got {d!r}")
    _unknown_keys(
      d, ("role", "content", "tool_calls", "stop_reason", "tool_call_id", "name"), "message"
    )
    for required in ("role", "content"):
      if required not in d:
        raise ValueError(f"Message {dict(d)} is missing {required!r}")
    content = d["content"]
    if content is None and d.get("tool_calls"):
      content = ""
    return cls(
      role=d["role"],
      content=content,
      tool_calls=tuple(ToolCall.from_dict(call) for call in d.get("tool_calls", ())),
      stop_reason=d.get("stop_reason", "end_of_turn"),
    )


class ChatFormat:
  """Encodes messages as `<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>`."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def _encode_text(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, bos=False, eos=False)

  def encode_header(self, role: str) -> list[int]:
    """Ids of `<|start_header_id|>ROLE<|end_header_id|>\\n\\n`."""
    if role not in ROLES:
      raise ValueError(f"Unknown message role {role!r}; expected one of {list(ROLES)}")
    return [
      self.tokenizer.start_header_id,
      *self._encode_text(_HEADER_NAMES.get(role, role)),
      self.tokenizer.end_header_id,
      *self._encode_text("\n\n"),
    ]

  def encode_message(self, message: Message | Mapping[str, Any]) -> list[int]:
    """Ids of one message (a Message or its dict, `Message.from_dict`): header, <|python_tag|> if
    the first call is code, content, calls, end."""
    message = Message.from_dict(message)
    ids = self.encode_header(message.role)
    if message.tool_calls and message.tool_calls[0].tool_name == CODE_INTERPRETER:
      ids.append(self.tokenizer.python_tag_id)
    ids.extend(self._encode_text(message.content))
    for call in message.tool_calls:
      ids.extend(self._encode_text(call.to_text()))
    end_of_message = message.stop_reason == "end_of_message"
    ids.append(self.tokenizer.eom_id if end_of_message else self.tokenizer.eot_id)
    return ids

  def encode_dialog_prompt(self, messages: Sequence[Message | Mapping[str, Any]]) -> list[int]:
    """Ids of <|begin_of_text|>, every message, then an open assistant header."""
    ids = [self.tokenizer.bos_id]
    for message in messages:
      ids.extend(self.encode_message(message))
    ids.extend(self.encode_header("assistant"))
    return ids
