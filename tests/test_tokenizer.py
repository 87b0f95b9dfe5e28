"""Our tokenizer against Meta's reference `llama_models.llama3.tokenizer.Tokenizer`."""

import jax.numpy as jnp
import numpy as np
import pytest
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama3_jax.tokenizer import Tokenizer

PYTHON_CODE = '''\
def fib(n: int) -> int:
    """Returns the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
\tprint({k: fib(k) for k in range(10)})  # dict comprehension
'''

CORPUS = {
  "empty": "",
  "english": "The quick brown fox jumps over the lazy dog. It's 9:41 AM, isn't it? They'd've known.",
  "python": PYTHON_CODE,
  "mixed_whitespace": "a \t\n\n  b\r\n\r\n   \u00a0\u2003c   \n",
  "digits": "3.14159265358979323846264338327950288419716939937510 and 1,000,000,000",
  "chinese": "我们训练了一个拥有四千零五十亿参数的语言模型。",
  "arabic": "نماذج اللغة الكبيرة تتعلم من كميات هائلة من النصوص.",
  "hindi": "बड़े भाषा मॉडल बहुत सारे पाठ से सीखते हैं।",
  "russian": "Большие языковые модели обучаются на огромных объёмах текста.",
  "japanese": "大規模言語モデルは、膨大なテキストから学習します。カタカナとひらがな。",
  "emoji": "🦙🔥 llamas 👩‍💻👨‍👩‍👧‍👦 🇫🇷 ✨",
  "special_strings": (
    "<|begin_of_text|>hi<|eot_id|><|start_header_id|>user<|end_header_id|> <|reserved_special_token_42|>"
  ),
  "long_spaces": " " * 30_001 + "x",
  "long_newlines": "\n" * 26_000 + "end",
  "long_digits": "1234567890" * 6_000,
  "long_word": "a" * 50_000 + " b",
  "long_mixed_runs": ("z" * 25_001 + " " * 25_001) * 2,
  # Char 400,000 falls inside "language": Meta's 400k-char chunking changes the ids there.
  "over_400k_chars": ("Llama 3 is a herd of language models. " * 11_000)[12:420_012] + " 你好 🦙",
}


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.default()


@pytest.fixture(scope="module")
def meta_tokenizer():
  return MetaTokenizer.get_instance()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_ids_match_meta(tokenizer, meta_tokenizer, name):
  text = CORPUS[name]
  ids = tokenizer.encode(text, bos=True, eos=True)
  assert ids == meta_tokenizer.encode(text, bos=True, eos=True)
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids[1:-1]) == text


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (False, True)])
def test_bos_eos_flags(tokenizer, meta_tokenizer, bos, eos):
  text = CORPUS["english"]
  assert tokenizer.encode(text, bos=bos, eos=eos) == meta_tokenizer.encode(text, bos=bos, eos=eos)


def test_special_strings_are_plain_text_by_default(tokenizer):
  ids = tokenizer.encode(CORPUS["special_strings"], bos=False, eos=False)
  assert not set(ids) & set(tokenizer.special_tokens.values())


def test_special_strings_allowed(tokenizer, meta_tokenizer):
  text = CORPUS["special_strings"]
  ids = tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
  assert ids == meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
  assert ids[0] == tokenizer.bos_id and ids[2] == tokenizer.eot_id
  assert tokenizer.special_tokens["<|reserved_special_token_42|>"] in ids
  only_eot = {"<|eot_id|>"}
  expected = meta_tokenizer.encode(text, bos=False, eos=False, allowed_special=only_eot)
  assert tokenizer.encode(text, bos=False, eos=False, allowed_special=only_eot) == expected
  assert tokenizer.decode(ids) == text


def test_disallowed_special_raises(tokenizer):
  with pytest.raises(ValueError):
    tokenizer.encode(CORPUS["special_strings"], bos=False, eos=False, disallowed_special="all")


def test_special_tokens_match_meta(tokenizer, meta_tokenizer):
  assert tokenizer.vocab_size == meta_tokenizer.n_words == 128_256
  assert tokenizer.special_tokens == meta_tokenizer.special_tokens
  assert len(tokenizer.special_tokens) == 256
  assert (tokenizer.bos_id, tokenizer.eos_id) == (128_000, 128_001)
  assert tokenizer.pad_id == 128_004
  assert (tokenizer.start_header_id, tokenizer.end_header_id) == (128_006, 128_007)
  assert (tokenizer.eom_id, tokenizer.eot_id, tokenizer.python_tag_id) == (
    128_008,
    128_009,
    128_010,
  )
  assert tokenizer.special_tokens["<|image|>"] == 128_011
  assert tokenizer.special_tokens["<|reserved_special_token_2|>"] == 128_012
  assert tokenizer.special_tokens["<|reserved_special_token_245|>"] == 128_255
  assert tokenizer.stop_ids == frozenset(meta_tokenizer.stop_tokens)
  for name in ("bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "python_tag_id"):
    assert getattr(tokenizer, name) == getattr(meta_tokenizer, name)


def test_decode_accepts_arrays(tokenizer):
  text = CORPUS["english"]
  ids = tokenizer.encode(text, bos=False, eos=False)
  assert tokenizer.decode(np.array(ids, dtype=np.int32)) == text
  assert tokenizer.decode(jnp.array(ids)) == text
  assert tokenizer.decode([]) == ""


@pytest.mark.parametrize("bad_id", [-1, 128_256, 10**9])
def test_decode_out_of_vocab(tokenizer, bad_id):
  with pytest.raises(ValueError, match=rf"\[{bad_id}\].*128256"):
    tokenizer.decode([1, 2, bad_id])


def test_decode_rejects_non_integer_ids(tokenizer):
  with pytest.raises(ValueError, match="integer"):
    tokenizer.decode(np.array([1.0, 2.0]))


def test_encode_rejects_non_str(tokenizer):
  with pytest.raises(TypeError, match="str"):
    tokenizer.encode(b"bytes", bos=False, eos=False)


def test_missing_file(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.model"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    Tokenizer.from_file(missing)


def test_malformed_file(tmp_path):
  bad = tmp_path / "tokenizer.model"
  bad.write_text("aGk= 0\nnot-a-valid-line\n")
  with pytest.raises(ValueError, match="tokenizer.model:2"):
    Tokenizer.from_file(bad)
