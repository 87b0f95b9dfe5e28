"""The reward model's module: the language model's backbone (no output head) and a scalar head."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model.layers import WEIGHT_INIT
from llama3_jax.model.transformer import Transformer

_SCORE_INIT = nn.with_logical_partitioning(WEIGHT_INIT, ("embed",))


def init_score(rng: jax.Array, cfg: ModelConfig) -> nn.LogicallyPartitioned:
  """A new scalar head [dim] in `param_dtype` (normal, std 0.02), with its logical axes."""
  return _SCORE_INIT(rng, (cfg.dim,), jnp.dtype(cfg.param_dtype))


class RewardModel(nn.Module):
  """tokens [B, T] -> rewards [B, T] float32 (read at each response's last token)."""

  cfg: ModelConfig

  def setup(self):
    self.backbone = Transformer(self.cfg, lm_head=False)
    self.score = self.param("score", init_score, self.cfg)

  def __call__(self, tokens, positions=None, segment_ids=None, branch_ids=None):
    hidden_BTD = self.backbone.features(tokens, positions, segment_ids, branch_ids)
    return jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), self.score.astype(jnp.float32))
