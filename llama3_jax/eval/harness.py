"""lm-evaluation-harness adapter: our models as the harness's `llama3_jax` model, scoring and
generating as its `hf` model does on the same checkpoint (context/continuation split, BOS, rolling
windows, stop strings), batched and optionally on a mesh.

  python -m llama3_jax.eval.harness --model llama3_jax \\
      --model_args checkpoint=/ckpt/Llama3.1-8B,mesh=tensor=8 --batch_size 8 --tasks hellaswag

(`lm_eval` itself finds the model once this module is imported; this entry point is lm_eval's own
command line with it registered.)
"""

import sys
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
import lm_eval.models  # noqa: F401  the harness's own models (it loads them only into an empty registry)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llama3_jax.config import MeshConfig, ModelConfig
from llama3_jax.convert import checkpoint_or_preset
from llama3_jax.inference import SamplingConfig, generate
from llama3_jax.model import Transformer
from llama3_jax.parallel import make_mesh, mesh_context
from llama3_jax.tokenizer import Tokenizer

MIN_BUCKET = 16  # rows are padded to a power of two of at least this many tokens: few compiles


def bucket(length: int) -> int:
  return max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())


class TokenScorer:
  """Log-probabilities of next tokens under a model: `score(rows)` takes (inputs, targets) id
  lists of equal lengths and gives per row (log-probs [T] of the targets, whether each target is
  the argmax [T]), `batch_size` rows at a time (the last batch padded)."""

  def __init__(self, cfg: ModelConfig, params, batch_size: int, mesh=None):
    self.batch_size, self.mesh = batch_size, mesh
    model = Transformer(cfg)

    def scores(params, tokens_BT, targets_BT):
      logits = model.apply({"params": params}, tokens_BT).astype(jnp.float32)
      logp = jax.nn.log_softmax(logits, axis=-1)
      picked = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
      return picked, jnp.argmax(logits, axis=-1) == targets_BT

    self._scores, self._params = jax.jit(scores), params

  def score(self, rows: Sequence[Tuple[List[int], List[int]]]):
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start : start + self.batch_size]
      length = bucket(max(len(inputs) for inputs, _ in chunk))
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for i, (inputs, wanted) in enumerate(chunk):
        tokens[i, : len(inputs)], targets[i, : len(wanted)] = inputs, wanted
      with mesh_context(self.mesh):
        picked, greedy = jax.device_get(self._scores(self._params, tokens, targets))
      out.extend((picked[i, : len(w)], greedy[i, : len(w)]) for i, (_, w) in enumerate(chunk))
    return out


@register_model("llama3_jax")
class Llama3JaxLM(TemplateLM):
  """The harness's model for a checkpoint of ours, Meta's or Hugging Face's (`checkpoint=PATH`),
  or a preset with random weights (`config=NAME,seed=N`), `batch_size` rows per forward pass,
  contexts cut to `max_length` tokens (default: the model's max_seq_len), computing in `dtype`
  (default: the weights', as the `hf` model does), parameters sharded on `mesh` (e.g.
  `mesh=tensor=2`; default one device)."""

  def __init__(
    self,
    checkpoint: Optional[str] = None,
    config: str = "tiny",
    seed: int = 0,
    batch_size=8,
    max_length: Optional[int] = None,
    mesh: str = "",
    max_gen_toks: int = 256,
    dtype: Optional[str] = None,
    **unused,
  ):
    super().__init__()
    self.mesh = make_mesh(MeshConfig.parse(mesh)) if mesh else None
    cfg, self.params = checkpoint_or_preset(checkpoint, config, int(seed), self.mesh)
    self.cfg = cfg.replace(dtype=dtype or cfg.param_dtype)
    self.tokenizer_ = Tokenizer.default()
    self._max_length = int(max_length or self.cfg.max_seq_len)
    self.max_gen_toks = int(max_gen_toks)
    size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": 8
    self.scorer = TokenScorer(self.cfg, self.params, size, self.mesh)
    self.batch_size = size
    logging.info("lm-eval model %s, batch %d, max_length %d", self.cfg.name, size, self._max_length)

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer_.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs):
    """Ids of `string`, with <|begin_of_text|> first unless `add_special_tokens` is False or the
    string starts with it (as the `hf` model encodes with Llama 3's tokenizer)."""
    bos = add_special_tokens is not False and not string.startswith("<|begin_of_text|>")
    return self.tokenizer_.encode(string, bos=bos, eos=False, allowed_special="all")

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(sum of log-probs, greedy) of each request's continuation ids after its context ids, the
    whole cut to the last max_length + 1 tokens."""
    rows = []
    for _, context, continuation in requests:
      whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
      rows.append((whole[:-1], whole[1:]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    scored = dict(zip(order, self.scorer.score([rows[i] for i in order])))
    results = []
    for i, (_, _, continuation) in enumerate(requests):
      picked, greedy = scored[i]
      n = len(continuation)
      result = (float(np.sum(picked[-n:], dtype=np.float64)), bool(np.all(greedy[-n:])))
      if requests[i][0] is not None:
        self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
      results.append(result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
    """Log-likelihood of each whole text, in disjoint windows of max_length tokens with the
    longest context each can have (the harness's rolling windows)."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      (text,) = request.args
      for window in map(
        lm_utils.make_disjoint_window,
        lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        ),
      ):
        windows.append((None, *window))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[owner] += logp
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
    """Each context continued (greedily unless `do_sample`) up to `max_gen_toks` tokens or a stop
    id, cut before the first of its `until` strings (the end-of-text token's text among them)."""
    eos = "<|end_of_text|>"
    results: List[Optional[str]] = [None] * len(requests)
    groups: Dict[str, List[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
    for indices in groups.values():
      kwargs = dict(requests[indices[0]].args[1])
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      until = until + [eos] if eos not in until else until
      new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      sampling = SamplingConfig(temperature=0.0)
      if kwargs.get("do_sample"):
        sampling = SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)))
      limit = self.max_length - new_tokens
      if limit < 1:
        raise ValueError(f"max_gen_toks {new_tokens} leaves no context in {self.max_length}")
      for start in range(0, len(indices), self.batch_size):
        batch = indices[start : start + self.batch_size]
        prompts = [self.tok_encode(requests[i].args[0])[-limit:] for i in batch]
        outputs = generate(
          self.cfg,
          self.params,
          prompts,
          max_new_tokens=new_tokens,
          stop_ids=self.tokenizer_.stop_ids,
          sampling=sampling,
          mesh=self.mesh,
        )
        for i, ids in zip(batch, outputs):
          text = self.tokenizer_.decode([t for t in ids if t < self.tokenizer_.bos_id])
          for stop in until:
            text = text.split(stop)[0]
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return results


def main(argv: Sequence[str]) -> None:
  """lm_eval's command line, with `llama3_jax` among its models."""
  from lm_eval.__main__ import cli_evaluate

  sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  main(sys.argv[1:])
