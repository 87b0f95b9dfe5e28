"""Quality of the paper's FP8 serving quantization (Sec. 6.2) against the same model in bf16.

  python experiments/bench_fp8.py --checkpoint /runs/tiny --reward_model /runs/rm

On documents of the embedded corpus: the per-token KL(bf16 || fp8) of the next-token
distributions, how often their argmaxes agree, and both losses; greedy continuations of corpus
prefixes (how many are identical, and the mean length of the common start); and the paper's own
check, the reward model's scores of responses sampled from the bf16 and from the fp8 policy
(mean and quantiles side by side). Without --reward_model the scores come from a reward head of
random weights on the bf16 policy's features (the machinery, not a quality judgement).
"""

import cli
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import llama3_jax as l3
from llama3_jax.convert import load_checkpoint
from llama3_jax.data import embedded_corpus
from llama3_jax.inference.quantize import quantize_params
from llama3_jax.model.spec import reward_params_from_lm
from llama3_jax.posttrain.rejection import rejection_sample

cli.define("checkpoint", "preset", "model", "generation", "sampling", "reward_model")
FLAGS = flags.FLAGS
_ROWS = flags.DEFINE_integer(
  "score_rows", 8, "Corpus documents scored (their first --score_len tokens)."
)
_SCORE_LEN = flags.DEFINE_integer("score_len", 256, "Tokens per scored row.")
_PROMPTS = flags.DEFINE_integer("num_prompts", 4, "Prompts for greedy continuations and sampling.")
_SAMPLES = flags.DEFINE_integer("responses", 8, "Responses sampled per prompt and policy.")
_QUANTILES = (0.1, 0.5, 0.9)


def _documents(tokenizer, count: int, min_tokens: int):
  """Token ids of `count` corpus documents of at least `min_tokens`, spread over the corpus."""
  corpus = embedded_corpus()
  picked = []
  for index in np.linspace(0, len(corpus) - 1, 8 * count).astype(int):
    text = corpus[int(index)]
    ids = tokenizer.encode(text, bos=True, eos=False) if text else []
    if len(ids) >= min_tokens:
      picked.append(ids)
    if len(picked) == count:
      return picked
  raise ValueError(f"The corpus has fewer than {count} documents of {min_tokens} tokens")


@jax.jit
def _compare(logits_p, logits_q, targets):
  """Per row [B]: mean KL(p || q) nats, argmax agreement, both mean NLLs of `targets`."""
  log_p, log_q = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  agree = logits_p.argmax(-1) == logits_q.argmax(-1)
  nll = lambda lp: -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
  return kl.mean(-1), kl.max(-1), agree.mean(-1), nll(log_p).mean(-1), nll(log_q).mean(-1)


def _logit_stats(models, rows):
  (cfg, params), (fp8_cfg, fp8_params) = models
  stats = []
  for ids in rows:
    tokens = jnp.asarray([ids[: _SCORE_LEN.value]])
    exact = l3.Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    quantized = l3.Transformer(fp8_cfg).apply({"params": fp8_params}, tokens[:, :-1])
    stats.append([float(x[0]) for x in _compare(exact, quantized, tokens[:, 1:])])
  kl, kl_max, agree, nll, nll_fp8 = np.asarray(stats).T
  tokens = len(rows) * (_SCORE_LEN.value - 1)
  print(f"--- logits over {len(rows)} corpus rows x {_SCORE_LEN.value - 1} next tokens ({tokens})")
  print(
    f"KL(bf16 || fp8): mean {kl.mean():.3e} nats/token, worst row mean {kl.max():.3e}, ", end=""
  )
  print(f"worst token {kl_max.max():.3e}")
  print(f"argmax agreement: {agree.mean():.4f}")
  print(
    f"loss: bf16 {nll.mean():.4f}, fp8 {nll_fp8.mean():.4f} ({nll_fp8.mean() - nll.mean():+.4f})"
  )


def _greedy_stats(models, prompts):
  outputs = [
    l3.generate(cfg, params, prompts, max_new_tokens=FLAGS.max_new_tokens) for cfg, params in models
  ]
  same = [a == b for a, b in zip(*outputs)]
  common = []
  for a, b in zip(*outputs):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    common.append(n)
  print(
    f"--- greedy continuations of {len(prompts)} corpus prefixes, {FLAGS.max_new_tokens} tokens"
  )
  print(
    f"identical: {sum(same)}/{len(same)}; common start: {np.mean(common):.1f} tokens on average"
  )


def _reward_model(cfg, params):
  if FLAGS.reward_model:
    return load_checkpoint(FLAGS.reward_model, kind="reward", dtype=cfg.dtype)
  print("--- no --reward_model: scores from a random reward head on the bf16 policy's features")
  return cfg, reward_params_from_lm(cfg, params, jax.random.key(FLAGS.seed + 1))


def _reward_stats(models, chat, prompt_texts):
  reward_cfg, reward_params = _reward_model(*models[0])
  sampling = cli.sampling_config()
  columns = []
  for cfg, params in models:
    rewards = []
    for i, text in enumerate(prompt_texts):
      scored = rejection_sample(
        chat,
        cfg,
        params,
        reward_cfg,
        reward_params,
        [l3.Message("user", text)],
        samples=_SAMPLES.value,
        max_new_tokens=FLAGS.max_new_tokens,
        sampling=sampling,
        rng=jax.random.key(FLAGS.seed + 100 + i),
      )
      rewards += [s.reward for s in scored]
    columns.append(np.asarray(rewards))
  print(f"--- reward of {len(columns[0])} sampled responses ({len(prompt_texts)} prompts)")
  print(f"{'':8}{'mean':>10}" + "".join(f"{'p' + str(int(q * 100)):>10}" for q in _QUANTILES))
  for name, rewards in zip(("bf16", "fp8"), columns):
    quantiles = "".join(f"{np.quantile(rewards, q):10.4f}" for q in _QUANTILES)
    print(f"{name:8}{rewards.mean():10.4f}{quantiles}")


def main(argv):
  del argv
  cfg, params = cli.load_model(dtype=FLAGS.dtype or "bfloat16")
  params = jax.device_put(params)
  models = ((cfg, params), quantize_params(cfg, params))
  print(f"--- {cfg.name}: {cfg.n_layers} layers, fp8 feed-forward in layers 1..{cfg.n_layers - 2}")
  tokenizer = l3.Tokenizer.default()
  rows = _documents(tokenizer, max(_ROWS.value, _PROMPTS.value), _SCORE_LEN.value)
  _logit_stats(models, rows[: _ROWS.value])
  prompts = [ids[:32] for ids in rows[: _PROMPTS.value]]
  _greedy_stats(models, prompts)
  prompt_texts = ["Explain what this code does:\n" + tokenizer.decode(ids[1:]) for ids in prompts]
  _reward_stats(models, l3.ChatFormat(tokenizer), prompt_texts)


if __name__ == "__main__":
  cli.run(main)
