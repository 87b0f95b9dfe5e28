"""The binaries' one flag vocabulary (experiments/cli.py): every flag name is defined in one place,
no binary imports another, each binary's --help lists the shared flags it takes, and the README's
flag table is the vocabulary's."""

import ast
import os
import re
import subprocess
import sys

import pytest
from binary_flags import (
  BINARIES,
  EXPERIMENTS,
  REPO,
  cli,
  group_flags,
  own_flags,
  source_tree,
  vocabulary_groups,
)


def test_every_flag_name_is_defined_once():
  shared = [name for entries in cli._GROUPS.values() for _, name, *_ in entries]
  assert len(shared) == len(set(shared))
  owners = {name: "cli" for name in shared}
  for binary in BINARIES:
    for name in own_flags(source_tree(binary)):
      assert name not in owners, f"--{name} defined by {binary}.py and {owners[name]}"
      owners[name] = binary


def test_no_binary_imports_another():
  for binary in BINARIES:
    imported = {
      alias.name.split(".")[0]
      for node in ast.walk(source_tree(binary))
      if isinstance(node, (ast.Import, ast.ImportFrom))
      for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not imported & set(BINARIES), (binary, imported & set(BINARIES))


def test_readme_flag_table_is_the_vocabulary():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert cli.flag_table() in readme


@pytest.mark.parametrize("binary", BINARIES)
def test_help_lists_the_shared_flags_a_binary_takes(binary):
  groups = vocabulary_groups(source_tree(binary))
  done = subprocess.run(
    [sys.executable, os.path.join(EXPERIMENTS, f"{binary}.py"), "--helpshort"],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode in (0, 1) and f"{binary}.py:" in done.stdout, done.stderr[-2000:]
  listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", done.stdout, re.M))
  expected = group_flags(groups)
  assert expected <= listed, (binary, sorted(expected - listed), done.stderr[-2000:])
