"""Our chat format against Meta's reference `llama_models.llama3.chat_format.ChatFormat`."""

import pytest
from llama_models.datatypes import RawMessage, StopReason
from llama_models.datatypes import ToolCall as MetaToolCall
from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama3_jax.tokenizer import ChatFormat, Message, Tokenizer, ToolCall

SYSTEM = Message(
  "system",
  "Environment: ipython\nTools: brave_search, wolfram_alpha\n\nYou are a helpful assistant.",
)
FIBONACCI_CODE = "a, b = 0, 1\nfor _ in range(20):\n    a, b = b, a + b\nprint(a)"
USER = Message("user", "What is the weather in Menlo Park today? Also, compute 2**10.")

DIALOGS = {
  "system_user": [SYSTEM, USER],
  "user_only_with_special_strings": [
    Message("user", "Print <|eot_id|> and <|begin_of_text|> literally.")
  ],
  "multi_turn": [
    SYSTEM,
    Message("user", "Hi! 你好 🦙"),
    Message("assistant", "Hello! How can I help?"),
    Message("user", "Tell me a joke about llamas."),
    Message("assistant", "Why did the llama cross the road? To get to the other *side*."),
    Message("user", "Another one, please."),
  ],
  "brave_search_call": [
    SYSTEM,
    USER,
    Message(
      "assistant",
      "",
      tool_calls=[ToolCall("c1", "brave_search", {"query": "Menlo Park weather today"})],
      stop_reason="end_of_message",
    ),
    Message("ipython", '{"temperature": "21C", "conditions": "sunny"}'),
  ],
  "wolfram_and_photogen_calls": [
    USER,
    Message(
      "assistant",
      "Let me compute that.",
      tool_calls=[
        ToolCall("c2", "wolfram_alpha", {"query": "2^10"}),
        ToolCall("c3", "photogen", {"query": "a llama in the sun"}),
      ],
      stop_reason="end_of_message",
    ),
    Message("ipython", "1024"),
    Message("assistant", "2**10 is 1024."),
  ],
  "code_interpreter_call": [
    SYSTEM,
    Message("user", "Compute the 20th Fibonacci number."),
    Message(
      "assistant",
      "",
      tool_calls=[ToolCall("c4", "code_interpreter", {"code": FIBONACCI_CODE})],
      stop_reason="end_of_message",
    ),
    Message("ipython", "6765"),
    Message("assistant", "The 20th Fibonacci number is 6765."),
  ],
  "custom_tool_call": [
    Message("system", "You have access to get_stock_price(ticker: str, exchange: str)."),
    Message("user", "What's Meta's stock price?"),
    Message(
      "assistant",
      "",
      tool_calls=[
        ToolCall("c5", "get_stock_price", {"ticker": "META", "n": [1, 2.5, None], "live": True})
      ],
    ),
    Message("ipython", '{"price": 512.3}'),
  ],
  "tool_role_alias": [
    USER,
    Message(
      "assistant",
      "",
      tool_calls=[ToolCall("c1", "code_interpreter", {"code": "2**10"})],
      stop_reason="end_of_message",
    ),
    Message("tool", "1024"),
  ],
  "assistant_eom_without_tool": [
    USER,
    Message("assistant", "Searching...", stop_reason="end_of_message"),
  ],
}


def to_meta(message: Message) -> RawMessage:
  return RawMessage(
    role="tool" if message.role == "ipython" else message.role,
    content=message.content,
    stop_reason=StopReason(message.stop_reason),
    tool_calls=[
      MetaToolCall(call_id=call.call_id, tool_name=call.tool_name, arguments=call.arguments)
      for call in message.tool_calls
    ],
  )


@pytest.fixture(scope="module")
def chat():
  return ChatFormat(Tokenizer.default())


@pytest.fixture(scope="module")
def meta_chat():
  return MetaChatFormat(MetaTokenizer.get_instance())


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_dialog_prompt_matches_meta(chat, meta_chat, name):
  dialog = DIALOGS[name]
  expected = meta_chat.encode_dialog_prompt([to_meta(m) for m in dialog]).tokens
  assert chat.encode_dialog_prompt(dialog) == expected


def test_message_layout(chat):
  tok = chat.tokenizer
  ids = chat.encode_message(Message("user", "Hi"))
  assert tok.decode(ids) == "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
  call = ToolCall("c", "code_interpreter", {"code": "print(1)"})
  ids = chat.encode_message(
    Message("assistant", "", tool_calls=[call], stop_reason="end_of_message")
  )
  expected = "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>print(1)<|eom_id|>"
  assert tok.decode(ids) == expected
  prompt = chat.encode_dialog_prompt([Message("ipython", "ok")])
  assert tok.decode(prompt) == (
    "<|begin_of_text|><|start_header_id|>ipython<|end_header_id|>\n\nok<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
  )


def test_from_dict(chat):
  message = Message.from_dict(
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [
        {"call_id": "c", "tool_name": "brave_search", "arguments": {"query": "llamas"}}
      ],
      "stop_reason": "end_of_message",
    }
  )
  assert message == Message(
    "assistant", "", (ToolCall("c", "brave_search", {"query": "llamas"}),), "end_of_message"
  )
  assert Message.from_dict({"role": "user", "content": "hi"}) == Message("user", "hi")


@pytest.mark.parametrize(
  "d,match",
  [
    ({"role": "tool_result", "content": "x"}, "Unknown message role 'tool_result'"),
    ({"role": "user"}, "missing 'content'"),
    ({"content": "x"}, "missing 'role'"),
    ({"role": "user", "content": None}, "content must be a str"),
    ({"role": "user", "content": "x", "extra": 1}, r"Unknown message keys \['extra'\]"),
    ({"role": "user", "content": "x", "stop_reason": "out_of_tokens"}, "Unknown stop_reason"),
    ({"role": "user", "content": "x", "stop_reason": "end_of_message"}, "Only assistant"),
    ({"role": "assistant", "content": "", "tool_calls": [{"call_id": "c"}]}, "missing"),
    (
      {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"call_id": "c", "tool_name": "photogen", "arguments": {}}],
      },
      "needs a 'query'",
    ),
    ("not a dict", "must be an object"),
  ],
)
def test_from_dict_errors(d, match):
  with pytest.raises(ValueError, match=match):
    Message.from_dict(d)


def test_header_rejects_unknown_role(chat):
  with pytest.raises(ValueError, match="Unknown message role 'robot'"):
    chat.encode_header("robot")
