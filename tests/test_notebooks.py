"""Every notebook in experiments/notebooks runs top to bottom (code cells in one namespace); the
notebooks assert their own results."""

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(
  glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "notebooks", "*.ipynb"))
)


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  with open(path) as f:
    cells = json.load(f)["cells"]
  namespace = {"__name__": "__main__"}
  for cell in cells:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{path}:{cell['id']}", "exec"), namespace)
