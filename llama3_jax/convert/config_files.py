"""Reading the JSON config files of other checkpoint formats (Hugging Face config.json, Meta
params.json): each value type-checked as it is read, every error naming the file and the key."""

import json
import math
from typing import Any, Dict

_REQUIRED = object()


def build(config_class, where: str, **fields):
  """`config_class(**fields)`, its ValueError naming `where` (the file the fields came from)."""
  try:
    return config_class(**fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def read_json_object(path: str) -> Dict:
  """The JSON object in the file `path`; ValueError naming the file when it is not one."""
  try:
    with open(path, "rb") as f:
      value = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
  return value


class ConfigFile:
  """The values of a config file (`where` names it, and the entry within, in messages). A key
  that is absent or null takes its default; without one it is required."""

  def __init__(self, values: Dict, where: str):
    self.values, self.where = values, where

  def _get(self, key: str, default) -> Any:
    value = self.values.get(key)
    if value is None:
      if default is _REQUIRED:
        raise ValueError(f"{self.where} has no {key!r}, which is required")
      return default
    return value

  def _bad(self, key: str, expected: str, value) -> ValueError:
    return ValueError(f"{self.where}: {key} must be {expected}, got {value!r}")

  def count(self, key: str, default=_REQUIRED) -> int:
    """A positive whole number (not a bool, nor a string of digits)."""
    value = self._get(key, default)
    if value is not default and (
      isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
      raise self._bad(key, "a positive integer", value)
    return value

  def number(self, key: str, default=_REQUIRED) -> float:
    """A finite number > 0."""
    value = self._get(key, default)
    if value is default:
      return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise self._bad(key, "a finite number", value)
    if value <= 0:
      raise self._bad(key, "> 0", value)
    return float(value)

  def boolean(self, key: str, default=_REQUIRED) -> bool:
    value = self._get(key, default)
    if not isinstance(value, bool):
      raise self._bad(key, "true or false", value)
    return value

  def text(self, key: str, default=_REQUIRED) -> str:
    value = self._get(key, default)
    if not isinstance(value, str):
      raise self._bad(key, "a string", value)
    return value

  def texts(self, key: str, default=_REQUIRED) -> list:
    """A list of strings."""
    value = self._get(key, default)
    if value is not default and (
      not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
      raise self._bad(key, "a list of strings", value)
    return value

  def section(self, *keys: str) -> "ConfigFile":
    """The first of `keys` holding an object (empty when none does)."""
    for key in keys:
      value = self.values.get(key)
      if value is not None:
        if not isinstance(value, dict):
          raise self._bad(key, "an object", value)
        return ConfigFile(value, f"{self.where} {key}")
    return ConfigFile({}, f"{self.where} {keys[0]}")
