"""The Hugging Face side of a checkpoint's tokenizer and generation defaults: `tokenizer.json` (a
byte-level BPE built from our tiktoken ranks, giving the same ids), `tokenizer_config.json` (with
a chat template that renders as `ChatFormat` encodes) and `generation_config.json`.

tiktoken merges the adjacent pair whose concatenation has the lowest rank and takes a piece that is
itself a token whole; a `tokenizers` BPE with `ignore_merges` and, for every token, each split
into two tokens as a merge ranked by the token's rank does the same.
"""

import json
import os
from typing import Dict, List, Tuple

from llama3_jax.tokenizer.tokenizer import SPLIT_PATTERN, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Renders a dialog as ChatFormat.encode_dialog_prompt encodes it (add_generation_prompt: the open
# assistant header). Tool calls in our layout ({"tool_name", "arguments"}) or the OpenAI/HF one
# ({"function": {"name", "arguments"}}; arguments of a custom tool may be JSON text, taken as
# written); `tool` results are headed `ipython`.
CHAT_TEMPLATE = (
  "{{- bos_token }}"
  "{%- for message in messages %}"
  "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
  "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
  "{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and "
  "message['tool_calls'] else [] %}"
  "{%- for call in calls %}"
  "{%- set name = call['function']['name'] if call['function'] is defined else call['tool_name'] %}"
  "{%- if loop.first and name == 'code_interpreter' %}{{- '<|python_tag|>' }}{%- endif %}"
  "{%- endfor %}"
  "{{- message['content'] if message['content'] is string else '' }}"
  "{%- for call in calls %}"
  "{%- set name = call['function']['name'] if call['function'] is defined else call['tool_name'] %}"
  "{%- set arguments = call['function']['arguments'] if call['function'] is defined "
  "else call['arguments'] %}"
  "{%- if name in ['brave_search', 'wolfram_alpha', 'photogen'] %}"
  "{{- name + '.call(query=\"' + arguments['query'] + '\")' }}"
  "{%- elif name == 'code_interpreter' %}"
  "{{- arguments['code'] }}"
  "{%- else %}"
  "{%- set parameters = arguments if arguments is string else arguments | tojson %}"
  '{{- \'{"type": "function", "name": \' + name | tojson + \', "parameters": \' + '
  "parameters + '}' }}"
  "{%- endif %}"
  "{%- endfor %}"
  "{%- if message['stop_reason'] is defined and message['stop_reason'] == 'end_of_message' %}"
  "{{- '<|eom_id|>' }}{%- else %}{{- '<|eot_id|>' }}{%- endif %}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}"
  "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
  "{%- endif %}"
)


def byte_level_alphabet() -> Dict[int, str]:
  """GPT-2's byte -> printable character map of byte-level BPE vocabularies: printable Latin-1
  bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  kept += range(ord("®"), ord("ÿ") + 1)
  alphabet, extra = {}, 0
  for byte in range(256):
    if byte in kept:
      alphabet[byte] = chr(byte)
    else:
      alphabet[byte] = chr(256 + extra)
      extra += 1
  return alphabet


def vocab_and_merges(ranks: Dict[bytes, int]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """The byte-level vocabulary of tiktoken `ranks` and its merges: every split of a token into two
  tokens, ordered by the token's rank (then by the ranks of the two parts)."""
  alphabet = byte_level_alphabet()

  def text(token: bytes) -> str:
    return "".join(alphabet[b] for b in token)

  vocab = {text(token): rank for token, rank in ranks.items()}
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
    splits = [
      (ranks[token[:cut]], ranks[token[cut:]], cut)
      for cut in range(1, len(token))
      if token[:cut] in ranks and token[cut:] in ranks
    ]
    merges.extend((text(token[:cut]), text(token[cut:])) for _, _, cut in sorted(splits))
  return vocab, merges


def hf_tokenizer(tokenizer: Tokenizer):
  """Our tokenizer as a `tokenizers.Tokenizer`: the same ids, <|begin_of_text|> added in front."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
  from tokenizers import Tokenizer as HFTokenizer

  vocab, merges = vocab_and_merges(tokenizer.mergeable_ranks)
  hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
  hf.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ]
  )
  hf.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
  special = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
  hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in special])
  bos = "<|begin_of_text|>"
  hf.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.bos_id)]
  )
  return hf


def generation_config(tokenizer: Tokenizer) -> Dict:
  """Meta's generation defaults (temperature 0.6, top-p 0.9) and every stop id."""
  return {
    "bos_token_id": tokenizer.bos_id,
    "eos_token_id": sorted(tokenizer.stop_ids),
    "pad_token_id": tokenizer.pad_id,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
  }


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> Dict:
  return {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "pad_token": "<|finetune_right_pad_id|>",
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": max_length,
    "clean_up_tokenization_spaces": False,  # decode gives back the text, as tiktoken does
    "chat_template": CHAT_TEMPLATE,
  }


def save_hf_tokenizer(path: str, tokenizer: Tokenizer, max_length: int) -> None:
  """Writes tokenizer.json, tokenizer_config.json and generation_config.json into `path`."""
  hf_tokenizer(tokenizer).save(os.path.join(path, TOKENIZER_FILE))
  for name, contents in (
    (TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, max_length)),
    (GENERATION_CONFIG_FILE, generation_config(tokenizer)),
  ):
    with open(os.path.join(path, name), "w") as f:
      json.dump(contents, f, indent=2)
