"""The flags each experiments/ binary takes, read from its source: the ones it defines itself and
those of the vocabulary groups (experiments/cli.py) it defines. cli.py and jobs.py (the jobs
several binaries share) are not binaries."""

import ast
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
sys.path.insert(0, EXPERIMENTS)
import cli  # noqa: E402

BINARIES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(EXPERIMENTS, "*.py"))
  if os.path.basename(p) not in ("cli.py", "jobs.py")
)


def source_tree(binary: str) -> ast.Module:
  with open(os.path.join(EXPERIMENTS, f"{binary}.py")) as f:
    return ast.parse(f.read())


def own_flags(tree: ast.Module):
  """Names of the flags a module defines itself (flags.DEFINE_*("name", ...)), in order."""
  return [
    node.args[0].value
    for node in ast.walk(tree)
    if isinstance(node, ast.Call)
    and isinstance(node.func, ast.Attribute)
    and node.func.attr.startswith("DEFINE_")
    and node.args
    and isinstance(node.args[0], ast.Constant)
  ]


def vocabulary_groups(tree: ast.Module):
  """The vocabulary groups a module takes: the arguments of its cli.define(...) call
  (`*cli.PRETRAINING_GROUPS` expanded)."""
  groups = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "define":
      for arg in node.args:
        if isinstance(arg, ast.Constant):
          groups.append(arg.value)
        elif isinstance(arg, ast.Starred):
          groups += list(cli.PRETRAINING_GROUPS)
  return groups


def group_flags(groups):
  return {name for group in groups for _, name, *_ in cli._GROUPS[group]}


def binary_flags(binary: str):
  """Every flag `binary` takes."""
  tree = source_tree(binary)
  return set(own_flags(tree)) | group_flags(vocabulary_groups(tree))
