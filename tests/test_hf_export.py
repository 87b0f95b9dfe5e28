"""A Hugging Face export is complete for the ecosystem: `AutoTokenizer` reads our tokenizer files and
gives our ids (on the embedded corpus) and our chat format (`apply_chat_template`, tool calls in our
and in the OpenAI layout), `AutoModelForCausalLM` loads the model without warnings, and
`pipeline("text-generation")` continues greedily as `l3.generate`; every file is world-readable."""

import json
import logging as std_logging
import os
import stat

import jax
import pytest
import torch
import transformers

import llama3_jax as l3
from llama3_jax.data.corpus import embedded_corpus
from llama3_jax.tokenizer.chat_format import Message

DOCUMENTS = 60


@pytest.fixture(scope="module")
def tokenizer():
  return l3.Tokenizer.default()


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer):
  cfg = l3.get_config("tiny")
  params = l3.init_params(cfg, jax.random.key(3))
  path = str(tmp_path_factory.mktemp("hf"))
  l3.save_hf(path, cfg, params)
  return cfg, params, path


@pytest.fixture(scope="module")
def hf_tokenizer(export):
  return transformers.AutoTokenizer.from_pretrained(export[2])


def test_files_are_complete_and_world_readable(export):
  path = export[2]
  assert sorted(os.listdir(path)) == [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  for name in os.listdir(path):
    assert os.stat(os.path.join(path, name)).st_mode & stat.S_IROTH, name
  generation = transformers.GenerationConfig.from_pretrained(path)
  assert generation.eos_token_id == [128001, 128008, 128009]
  assert (generation.temperature, generation.top_p) == (0.6, 0.9)


def test_the_exported_tokenizer_gives_our_ids(hf_tokenizer, tokenizer):
  texts = [text for _, text in zip(range(DOCUMENTS), embedded_corpus())]
  assert sum(map(len, texts)) > 500_000
  for text in texts:
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == text
  with_bos = tokenizer.encode("Llamas hum.", bos=True, eos=False)
  assert hf_tokenizer("Llamas hum.")["input_ids"] == with_bos
  assert hf_tokenizer.bos_token_id == tokenizer.bos_id
  assert hf_tokenizer.pad_token_id == tokenizer.pad_id


DIALOGS = [
  [{"role": "user", "content": "Name three llamas."}],
  [
    {"role": "system", "content": "You are terse.\nAnswer in one line."},
    {"role": "user", "content": "  Why 2+2?  "},
    {"role": "assistant", "content": "Because."},
    {"role": "user", "content": "Ünïcödé ✓ 日本"},
  ],
  [
    {"role": "user", "content": "What is 7**7? And the weather in Paris?"},
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [
        {"call_id": "1", "tool_name": "code_interpreter", "arguments": {"code": "print(7**7)"}}
      ],
      "stop_reason": "end_of_message",
    },
    {"role": "ipython", "content": "823543"},
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [
        {"call_id": "2", "tool_name": "brave_search", "arguments": {"query": "Paris weather"}},
        {"call_id": "3", "tool_name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
      ],
      "stop_reason": "end_of_message",
    },
    {"role": "tool", "content": '{"temp": 21}'},
  ],
]


@pytest.mark.parametrize("dialog", DIALOGS, ids=["user", "turns", "tools"])
def test_chat_template_is_our_chat_format(hf_tokenizer, tokenizer, dialog):
  expected = l3.ChatFormat(tokenizer).encode_dialog_prompt([Message.from_dict(m) for m in dialog])
  got = hf_tokenizer.apply_chat_template(
    dialog, add_generation_prompt=True, tokenize=True, return_dict=False
  )
  assert list(got) == expected


def test_chat_template_takes_openai_tool_calls(hf_tokenizer, tokenizer):
  ours = [
    {"role": "user", "content": "Weather?"},
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [{"call_id": "1", "tool_name": "get_weather", "arguments": {"city": "Oslo"}}],
    },
  ]
  openai = [
    ours[0],
    {
      "role": "assistant",
      "content": None,
      "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
      ],
    },
  ]
  render = lambda dialog: hf_tokenizer.apply_chat_template(
    dialog, add_generation_prompt=True, tokenize=True, return_dict=False
  )
  expected = l3.ChatFormat(tokenizer).encode_dialog_prompt([Message.from_dict(m) for m in ours])
  assert list(render(openai)) == list(render(ours)) == expected


class _Warnings(std_logging.Handler):
  """Collects the warnings of transformers' logger (which does not propagate to the root)."""

  def __init__(self):
    super().__init__(std_logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    std_logging.getLogger("transformers").addHandler(self)
    return self

  def __exit__(self, *_):
    std_logging.getLogger("transformers").removeHandler(self)


def test_model_loads_without_warnings_and_generates_as_we_do(export, tokenizer):
  cfg, params, path = export
  with _Warnings() as caught:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  assert caught.messages == []
  with open(os.path.join(path, "config.json")) as f:
    old = dict(json.load(f), max_position_embeddings=cfg.max_seq_len)  # as exports were before
  with _Warnings() as caught:
    transformers.AutoConfig.for_model(**old)
  assert any("original_max_position_embeddings" in m for m in caught.messages)
  generator = transformers.pipeline("text-generation", model=model, tokenizer=path, device="cpu")
  prompts = ["def fibonacci(n):", "The llama is"]
  for prompt in prompts:
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    [ours] = l3.generate(cfg, params, [ids], max_new_tokens=12, sampling=l3.SamplingConfig(0.0))
    [out] = generator(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)
    assert out["generated_text"] == tokenizer.decode(ours)
