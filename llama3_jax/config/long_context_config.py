"""The long-context extension (paper Sec. 3.4.2): continued pretraining in stages of growing row
length, the global batch in tokens held constant, each stage on a mesh of its own."""

import dataclasses
from typing import Optional

from llama3_jax.config.base import ConfigBase
from llama3_jax.config.data_config import BatchStage, DataConfig
from llama3_jax.config.mesh_config import MeshConfig


@dataclasses.dataclass(frozen=True)
class LongContextStage(ConfigBase):
  """`tokens` training tokens in rows of `seq_len` tokens, on `mesh` (None: the run's mesh), e.g.
  with a larger `context` degree than the stage before."""

  seq_len: int
  tokens: int
  mesh: Optional[MeshConfig] = None

  def __post_init__(self):
    for field in ("seq_len", "tokens"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LongContextStage.{field} must be a positive int, got {value!r}")

  @classmethod
  def parse(cls, spec: str) -> "LongContextStage":
    """ "SEQ_LEN:TOKENS[@MESH]", e.g. "131072:133e9@fsdp=8,context=16,tensor=8"."""
    try:
      stage, _, mesh = spec.partition("@")
      seq_len, tokens = stage.split(":")
      count = float(tokens)
      if not count.is_integer():
        raise ValueError(f"{tokens} is not a whole number of tokens")
      return cls(int(seq_len), int(count), MeshConfig.parse(mesh) if mesh else None)
    except ValueError as e:
      raise ValueError(
        f"Bad long-context stage {spec!r}: expected SEQ_LEN:TOKENS[@MESH], e.g. "
        f"16384:1.3e11@fsdp=8,context=2 ({e})"
      ) from None

  @classmethod
  def _from_fields(cls, fields: dict) -> dict:
    if fields.get("mesh") is not None:
      fields["mesh"] = MeshConfig.from_dict(fields["mesh"])
    return fields


@dataclasses.dataclass(frozen=True)
class LongContextConfig(ConfigBase):
  """Stages run one after another; every step takes `tokens_per_step` tokens, so a stage of rows
  of L tokens takes tokens_per_step / L rows per step and ends after tokens / tokens_per_step
  steps (both must divide). The stages are one batch-size / sequence-length ramp (`ramp`) over
  one run: one step count, one learning-rate schedule, one data stream (no document restarted
  between stages); stage i covers steps `start_step(i)` + 1 .. `end_step(i)`."""

  stages: tuple[LongContextStage, ...]
  tokens_per_step: int

  def __post_init__(self):
    if isinstance(self.stages, list):
      object.__setattr__(self, "stages", tuple(self.stages))
    if not self.stages or not all(isinstance(s, LongContextStage) for s in self.stages):
      raise ValueError(f"LongContextConfig.stages must be LongContextStages, got {self.stages!r}")
    if (
      isinstance(self.tokens_per_step, bool)
      or not isinstance(self.tokens_per_step, int)
      or self.tokens_per_step <= 0
    ):
      raise ValueError(
        f"LongContextConfig.tokens_per_step must be a positive int, got {self.tokens_per_step!r}"
      )
    for i, stage in enumerate(self.stages):
      if self.tokens_per_step % stage.seq_len:
        raise ValueError(
          f"Long-context stage {i + 1}: tokens_per_step={self.tokens_per_step} is not a multiple of "
          f"its seq_len={stage.seq_len}"
        )
      if stage.tokens % self.tokens_per_step:
        raise ValueError(
          f"Long-context stage {i + 1}: its {stage.tokens} tokens are not a whole number of steps "
          f"of {self.tokens_per_step} tokens"
        )

  def rows(self, index: int) -> int:
    """Rows per step (the global batch size) of stage `index`."""
    return self.tokens_per_step // self.stages[index].seq_len

  def steps(self, index: int) -> int:
    return self.stages[index].tokens // self.tokens_per_step

  def start_step(self, index: int) -> int:
    """Steps before stage `index`."""
    return sum(self.steps(i) for i in range(index))

  def end_step(self, index: int) -> int:
    """The step stage `index` ends at."""
    return self.start_step(index) + self.steps(index)

  @property
  def total_steps(self) -> int:
    return self.end_step(len(self.stages) - 1)

  @property
  def total_tokens(self) -> int:
    return sum(s.tokens for s in self.stages)

  @property
  def max_seq_len(self) -> int:
    return max(s.seq_len for s in self.stages)

  def ramp(self) -> tuple[BatchStage, ...]:
    """The batch shapes of every stage, each starting once the stages before spent their tokens."""
    starts = [sum(s.tokens for s in self.stages[:i]) for i in range(len(self.stages))]
    return tuple(
      BatchStage(start, self.rows(i), s.seq_len)
      for i, (start, s) in enumerate(zip(starts, self.stages))
    )

  def data_config(self, data: DataConfig) -> DataConfig:
    """`data` (sources, seed, split, ...) in the stages' shapes."""
    first, *rest = self.ramp()
    return data.replace(
      global_batch_size=first.global_batch_size, seq_len=first.seq_len, ramp=tuple(rest)
    )

  @classmethod
  def _from_fields(cls, fields: dict) -> dict:
    fields["stages"] = tuple(
      s if isinstance(s, LongContextStage) else LongContextStage.from_dict(s)
      for s in fields["stages"]
    )
    return fields


# The paper's extension: six stages from 8K (the pretraining length) to 128K over ~800B tokens, the
# global batch held at 15,728,640 tokens (1920 rows of 8K; 120 of 128K). The paper gives neither
# the stages' lengths nor their budgets: these grow by 16K to 64K, then by 32K, with equal budgets
# (8,477 steps each), and 15,728,640 is the nearest batch to the paper's 16M tokens that all six
# lengths divide.
PAPER_TOKENS_PER_STEP = 15_728_640
PAPER_STEPS_PER_STAGE = 8_477
PAPER_LONG_CONTEXT = LongContextConfig(
  stages=tuple(
    LongContextStage(seq_len, PAPER_STEPS_PER_STAGE * PAPER_TOKENS_PER_STEP)
    for seq_len in (16_384, 32_768, 49_152, 65_536, 98_304, 131_072)
  ),
  tokens_per_step=PAPER_TOKENS_PER_STEP,
)
