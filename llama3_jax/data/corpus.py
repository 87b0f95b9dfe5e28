"""The embedded default corpus: the Python standard library's own `.py` sources, one document per file.

Every Python installation ships them (about 12 MB in ~700 files for CPython 3.11, tests and installed
packages excluded), so small runs train on real text with no download. Listing takes a fraction of a
second; files are read lazily by the pipeline.
"""

import os
import sysconfig
from typing import Optional

from llama3_jax.data.sources import MalformedCounter, TextFiles

EMBEDDED_NAME = "embedded:stdlib"
# Third-party packages differ between installations; test suites hold odd encodings and generated data.
EXCLUDED_DIRS = frozenset(
  {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def stdlib_files(root: Optional[str] = None) -> list[str]:
  """Sorted paths of the non-empty `.py` files under `root` (default: the standard library).

  Directories named in EXCLUDED_DIRS are skipped; ValueError if no file remains.
  """
  root = sysconfig.get_paths()["stdlib"] if root is None else root
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
    for name in sorted(files):
      path = os.path.join(directory, name)
      if name.endswith(".py") and os.path.getsize(path):  # many __init__.py files are empty
        paths.append(path)
  if not paths:
    raise ValueError(f"The embedded corpus is empty: no .py files under {root!r}")
  return paths


def embedded_corpus(
  root: Optional[str] = None,
  *,
  skip_malformed: bool = True,
  counter: Optional[MalformedCounter] = None,
) -> TextFiles:
  """The default documents: one per standard-library source file, in sorted order."""
  return TextFiles(
    stdlib_files(root), name=EMBEDDED_NAME, skip_malformed=skip_malformed, counter=counter
  )
