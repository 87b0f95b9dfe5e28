"""What every frozen config dataclass shares: `replace`, and a dict round trip that rejects typos."""

import dataclasses
from typing import Any, Dict


class ConfigBase:
  """Mixin for frozen dataclasses; nested configs are rebuilt by overriding `_from_fields`."""

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> Dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Dict):
    """Inverse of `to_dict`; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**cls._from_fields(dict(d)))

  @classmethod
  def _from_fields(cls, fields: Dict) -> Dict:
    return fields

  def _require_at_least(self, minimum, *fields: str) -> None:
    """Raises ValueError naming the first of `fields` below `minimum` or not a number (NaN)."""
    for field in fields:
      value = getattr(self, field)
      if value != value or value < minimum:
        raise ValueError(
          f"{type(self).__name__}.{field} must be >= {minimum}, got {getattr(self, field)}"
        )
