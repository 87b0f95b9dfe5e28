"""Integrity of a training run's step checkpoints, and the one rule choosing the step to read.

Each step directory gets a manifest (`MANIFEST_FILE`: size and sha256 of every file) written
last: after every process's arrays are on disk and before Orbax renames the step into place, so a
step either lacks its final name or carries its manifest. A step is intact when every file in its
manifest is present with that size and digest. Orbax's own bookkeeping files, rewritten after the
rename (`UNDIGESTED`), are not covered.
"""

import concurrent.futures
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

from absl import logging

MANIFEST_FILE = "llama3_jax_manifest.json"
MANIFEST_FORMAT = 1
UNDIGESTED = ("_CHECKPOINT_METADATA", "commit_success.txt")
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def _digested_files(step_dir: str) -> List[str]:
  """Paths relative to `step_dir` of the files a manifest covers, sorted."""
  found = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      relative = os.path.relpath(os.path.join(root, name), step_dir)
      if relative != MANIFEST_FILE and relative not in UNDIGESTED:
        found.append(relative)
  return sorted(found)


def _digests(step_dir: str, files: List[str]) -> List[str]:
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # hashlib and reads release the GIL
    return list(pool.map(lambda f: _sha256(os.path.join(step_dir, f)), files))


def write_manifest(step_dir: str, step: int) -> None:
  """Digests every file under `step_dir` into its manifest (written atomically)."""
  files = _digested_files(step_dir)
  entries = {
    f: {"bytes": os.path.getsize(os.path.join(step_dir, f)), "sha256": digest}
    for f, digest in zip(files, _digests(step_dir, files))
  }
  manifest = {"format": MANIFEST_FORMAT, "step": step, "files": entries}
  partial = os.path.join(step_dir, f".{MANIFEST_FILE}.partial")
  with open(partial, "w") as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, os.path.join(step_dir, MANIFEST_FILE))


def _saved_before_manifests(step_dir: str) -> bool:
  """A run step saved before steps carried manifests: its run config (`config/metadata`, JSON)
  lacks the `progress` entry that every step saved with a manifest records."""
  try:
    with open(os.path.join(step_dir, "config", "metadata")) as f:
      return "progress" not in json.load(f)
  except (OSError, ValueError):
    return False


def problem(step_dir: str) -> Optional[str]:
  """Why the step at `step_dir` is not intact (a sentence naming the file), or None if it is. A
  step saved before manifests existed passes unverified, with a warning."""
  manifest_path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    if _saved_before_manifests(step_dir):
      logging.warning("%s was saved before manifests: read without verifying", step_dir)
      return None
    return f"no {MANIFEST_FILE} (an incomplete save)"
  try:
    with open(manifest_path) as f:
      entries = json.load(f)["files"]
    expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its {MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
  for name, (size, _) in expected.items():
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f"{name} is missing"
    if os.path.getsize(path) != size:
      return f"{name} has {os.path.getsize(path)} bytes, its manifest {size}"
  names = sorted(expected)
  try:
    digests = _digests(step_dir, names)
  except OSError as e:
    return f"a file cannot be read ({e})"
  for name, digest in zip(names, digests):
    if digest != expected[name][1]:
      return f"{name} differs from its digest in {MANIFEST_FILE} (a corrupted file)"
  return None


def step_numbers(directory: str) -> List[int]:
  """Every step directory name (digits) under `directory`, complete or not, oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(name)
    for name in os.listdir(directory)
    if name.isdigit() and os.path.isdir(os.path.join(directory, name))
  )


def newest_intact(
  directory: str, exclude: Tuple[int, ...] = ()
) -> Tuple[Optional[int], Dict[int, str]]:
  """(the newest intact step under `directory` not in `exclude`, or None; the problem of each
  newer step that is not intact). The one rule by which resume and `load_checkpoint` choose."""
  rejected = {}
  for step in reversed(step_numbers(directory)):
    if step in exclude:
      continue
    found = problem(os.path.join(directory, str(step)))
    if found is None:
      return step, rejected
    logging.warning("Step %d in %s is not intact: %s", step, directory, found)
    rejected[step] = found
  return None, rejected


def describe(rejected: Dict[int, str]) -> str:
  return "; ".join(f"step {step}: {why}" for step, why in sorted(rejected.items(), reverse=True))
