"""The embedded corpora: the Python standard library's own `.py` sources.

Every Python installation ships them (about 12 MB in ~700 files for CPython 3.11, tests and installed
packages excluded), so small runs train on real text with no download. `embedded:stdlib` (the
default) holds one document per file; `embedded:packages` one per package directory (`email`,
`asyncio`, ...: its files concatenated in sorted order), long documents (median ~2 x 10^4 tokens,
up to ~5 x 10^5) for long-context training offline. Listing takes a fraction of a second; files
are read lazily.
"""

import os
import sysconfig
from typing import Optional

from llama3_jax.data.sources import MAX_ROW_BYTES, DocumentSource, MalformedCounter, TextFiles

EMBEDDED_NAME = "embedded:stdlib"
EMBEDDED_PACKAGES = "embedded:packages"
FILE_SEPARATOR = "\n\n"
# Third-party packages differ between installations; test suites hold odd encodings and generated data.
EXCLUDED_DIRS = frozenset(
  {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def stdlib_files(root: Optional[str] = None) -> list[str]:
  """Sorted paths of the non-empty `.py` files under `root` (default: the standard library).

  Directories named in EXCLUDED_DIRS are skipped; ValueError if no file remains.
  """
  root = stdlib_root(root)
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


def stdlib_root(root: Optional[str] = None) -> str:
  return sysconfig.get_paths()["stdlib"] if root is None else root


def stdlib_packages(root: Optional[str] = None) -> list[tuple[str, list[str]]]:
  """(directory, its `stdlib_files`) of every package directly under `root` (default: the
  standard library) that holds a non-empty `.py` file, sorted by name."""
  root = stdlib_root(root)
  packages = []
  for name in sorted(os.listdir(root)):
    directory = os.path.join(root, name)
    if name in EXCLUDED_DIRS or not os.path.isdir(directory):
      continue
    try:
      packages.append((directory, stdlib_files(directory)))
    except ValueError:  # no source files
      continue
  if not packages:
    raise ValueError(f"The embedded package corpus is empty: no packages under {root!r}")
  return packages


class PackageTexts(DocumentSource):
  """One document per package: its files' texts joined by FILE_SEPARATOR."""

  def __init__(self, packages: list[tuple[str, list[str]]], *, name: str, **kwargs):
    super().__init__(name, **kwargs)
    self.packages = packages

  def __len__(self) -> int:
    return len(self.packages)

  def where(self, index: int) -> str:
    return self.packages[int(index)][0]

  def __getitem__(self, index: int) -> Optional[str]:
    directory, paths = self.packages[int(index)]
    parts = []
    for path in paths:
      with open(path, "rb") as f:
        parts.append(f.read(MAX_ROW_BYTES + 1))
    return self._text(FILE_SEPARATOR.encode().join(parts), directory, field="")


def embedded_packages(
  root: Optional[str] = None,
  *,
  skip_malformed: bool = True,
  counter: Optional[MalformedCounter] = None,
) -> PackageTexts:
  """Long documents: one per standard-library package, its files concatenated."""
  return PackageTexts(
    stdlib_packages(root), name=EMBEDDED_PACKAGES, skip_malformed=skip_malformed, counter=counter
  )


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


EMBEDDED = {EMBEDDED_NAME: embedded_corpus, EMBEDDED_PACKAGES: embedded_packages}
