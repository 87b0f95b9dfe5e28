"""Chat data for post-training: dialogs encoded as Meta's ChatFormat does, with the assistant's
tokens marked; SFT rows packed with those marks, and a loss that counts only them."""

import json

import jax
import numpy as np
import pytest
from llama_models.datatypes import RawMessage, StopReason
from llama_models.datatypes import ToolCall as MetaToolCall
from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

import llama3_jax as l3
from llama3_jax.config import DataConfig, DataSource
from llama3_jax.data import MalformedCounter, make_pipeline
from llama3_jax.data.chat import (
  encode_dialog,
  parse_preference_row,
  parse_sft_row,
  ranked_pairs,
  read_jsonl,
)
from llama3_jax.tokenizer import ChatFormat, Message, Tokenizer, ToolCall
from llama3_jax.train import cross_entropy_sums, shift_batch

TOKENIZER = Tokenizer.default()
CHAT = ChatFormat(TOKENIZER)
DIALOG = [
  Message("system", "You are terse."),
  Message("user", "Weather in Paris?"),
  Message(
    "assistant",
    "",
    tool_calls=[ToolCall("c1", "brave_search", {"query": "Paris weather"})],
    stop_reason="end_of_message",
  ),
  Message("ipython", '{"temperature": "12C"}'),
  Message("assistant", "It is 12C in Paris."),
  Message("user", "Thanks!"),
]


def _meta_tokens(messages):
  """Meta's encoding of the dialog without the open assistant header it appends."""
  meta = MetaChatFormat(MetaTokenizer.get_instance())
  raw = []
  for m in messages:
    calls = [
      MetaToolCall(call_id=c.call_id, tool_name=c.tool_name, arguments=c.arguments)
      for c in m.tool_calls
    ]
    stop = (
      StopReason.end_of_message if m.stop_reason == "end_of_message" else StopReason.end_of_turn
    )
    role = "tool" if m.role == "ipython" else m.role  # Meta names the tool-result role "tool"
    raw.append(RawMessage(role=role, content=m.content, tool_calls=calls, stop_reason=stop))
  tokens = meta.encode_dialog_prompt(raw).tokens
  return tokens[: -len(CHAT.encode_header("assistant"))]


def test_dialog_tokens_are_metas_and_only_the_assistants_content_and_ends_are_marked():
  dialog = encode_dialog(CHAT, DIALOG)
  assert dialog.tokens.tolist() == _meta_tokens(DIALOG)
  content = TOKENIZER.decode(dialog.tokens[dialog.content].tolist())
  assert content == 'brave_search.call(query="Paris weather")It is 12C in Paris.'
  assert dialog.tokens[dialog.end].tolist() == [TOKENIZER.eom_id, TOKENIZER.eot_id]
  # No header token (special tokens, the role text, the blank line) and nothing of another role.
  for start in np.flatnonzero(dialog.tokens == TOKENIZER.start_header_id):
    header_end = start + np.argmax(dialog.tokens[start:] == TOKENIZER.end_header_id) + 1
    assert not dialog.sft_targets[start : header_end + 1].any()
  assert dialog.sft_targets.sum() == dialog.content.sum() + 2
  assert not (dialog.content & dialog.end).any()


def test_rows_parse_with_errors_that_name_the_problem(tmp_path):
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
  assert [m.role for m in parse_sft_row({"messages": messages})] == ["user", "assistant"]
  with pytest.raises(ValueError, match="at least one assistant message"):
    parse_sft_row({"messages": messages[:1]})
  preference = parse_preference_row(
    {"prompt": messages[:1], "chosen": "Good", "rejected": "Bad", "edited": "Better"}
  )
  assert [m.content for m in preference.ranked] == ["Better", "Good", "Bad"]
  assert ranked_pairs(len(preference.ranked)) == [(0, 1), (0, 2), (1, 2)]
  pair = parse_preference_row({"prompt": messages[:1], "chosen": "a", "rejected": "b"})
  assert ranked_pairs(len(pair.ranked)) == [(0, 1)]
  with pytest.raises(ValueError, match=r"missing keys \['rejected'\]"):
    parse_preference_row({"prompt": messages[:1], "chosen": "a"})
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"messages": messages}) + "\n\n{oops\n")
  with pytest.raises(ValueError, match="bad.jsonl:3"):
    list(read_jsonl(str(path), parse_sft_row))


def _chat_file(path, n: int):
  rng = np.random.RandomState(0)
  with open(path, "w") as f:
    for i in range(n):
      user = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], rng.randint(3, 12)))
      dialog = [{"role": "user", "content": user}, {"role": "assistant", "content": f"{user} {i}"}]
      f.write(json.dumps({"messages": dialog}) + "\n")
    f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    f.write("not json\n")


def test_sft_rows_carry_targets_and_the_loss_counts_only_them(tmp_path):
  _chat_file(tmp_path / "chat.jsonl", 40)
  data = DataConfig(
    sources=(DataSource(str(tmp_path / "chat.jsonl"), "chat"),),
    seq_len=48,
    global_batch_size=4,
    held_out_fraction=0.0,
    num_epochs=1,
  )
  counter = MalformedCounter()
  batch = next(make_pipeline(data, TOKENIZER, counter=counter))
  assert (batch["segment_ids"] > 0).any(axis=1).all()
  # Targets mark exactly the assistant's tokens of each packed dialog (re-encoded here).
  assert set(np.unique(batch["targets"])) == {0, 1}
  assert not batch["targets"][batch["segment_ids"] == 0].any()
  header = CHAT.encode_header("assistant")
  for row_tokens, row_targets in zip(batch["tokens"], batch["targets"]):
    for start in np.flatnonzero(row_targets[1:] > row_targets[:-1]) + 1:
      if start >= len(header):  # else a dialog continued from the previous row
        assert row_tokens[start - len(header) : start].tolist() == header

  cfg = l3.get_config("test-3.1", vocab_size=TOKENIZER.vocab_size)
  params = l3.init_params(cfg, jax.random.key(0))
  inputs, targets, valid = shift_batch(batch)
  logits = l3.Transformer(cfg).apply({"params": params}, *inputs.values())
  ce_sum, _ = cross_entropy_sums(logits, targets, valid)
  # The loss by hand: -log softmax at the next token, over positions whose next token is an
  # assistant target of the same dialog.
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
  seg = batch["segment_ids"]
  counted = (batch["targets"][:, 1:] == 1) & (seg[:, 1:] == seg[:, :-1])
  picked = np.take_along_axis(log_probs, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(float(ce_sum), -picked[counted].sum(), rtol=1e-5)
  assert int(np.asarray(valid).sum()) == int(counted.sum()) < int((seg[:, 1:] > 0).sum())
  assert counter.total >= 1  # the dialog without an answer (and the bad line) were skipped


OPENAI_DIALOG = [
  {"role": "system", "content": "You are terse."},
  {"role": "user", "content": "Weather in Paris?"},
  {
    "role": "assistant",
    "content": None,
    "tool_calls": [
      {
        "id": "c1",
        "type": "function",
        "function": {"name": "brave_search", "arguments": '{"query": "Paris weather"}'},
      }
    ],
    "stop_reason": "end_of_message",
  },
  {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": "12C"}'},
  {"role": "assistant", "content": "It is 12C in Paris."},
  {"role": "user", "content": "Thanks!"},
]


def test_dict_messages_in_the_openai_layout_encode_as_metas():
  """{"role", "content"} dicts, OpenAI tool calls (arguments as JSON text) and `tool` results
  encode as the Message dialog, which is Meta's encoding."""
  assert CHAT.encode_dialog_prompt(OPENAI_DIALOG) == CHAT.encode_dialog_prompt(DIALOG)
  expected = _meta_tokens(DIALOG)
  np.testing.assert_array_equal(encode_dialog(CHAT, OPENAI_DIALOG).tokens, expected)
  with pytest.raises(ValueError, match="Tool call arguments are not JSON: '{query'"):
    Message.from_dict(
      {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{query"}}],
      }
    )


def test_trl_conversational_preference_rows_parse_as_ours():
  prompt = [{"role": "user", "content": "Best pet?"}]
  ours = {"prompt": prompt, "chosen": "A llama.", "rejected": "A rock."}
  explicit = {
    "prompt": prompt,
    "chosen": [{"role": "assistant", "content": "A llama."}],
    "rejected": [{"role": "assistant", "content": "A rock."}],
  }
  implicit = {
    "chosen": prompt + [{"role": "assistant", "content": "A llama."}],
    "rejected": prompt + [{"role": "assistant", "content": "A rock."}],
  }
  expected = parse_preference_row(ours)
  assert parse_preference_row(explicit) == expected == parse_preference_row(implicit)
  with pytest.raises(ValueError, match="'chosen' as a list must hold one assistant message, got 2"):
    parse_preference_row({**explicit, "chosen": explicit["chosen"] * 2})
