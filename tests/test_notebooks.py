"""notebooks/*.ipynb execute on CPU with the tiny preset and draw their figures (nbclient).

Part of the default run, so CI executes both notebooks (issue 15): each trains the
`fashion_mnist.py:test` preset in a fresh kernel (78 s for the two on a 2-core CPU); the
figure count catches a library call that turns the kernel's inline backend off. Outputs must
be stripped in git.
"""

import os

import helpers
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(helpers.REPO, "notebooks")


def _figures(notebook) -> int:
  return sum(
      "image/png" in output.get("data", {})
      for cell in notebook.cells
      if cell.cell_type == "code"
      for output in cell.get("outputs", [])
  )


@pytest.mark.parametrize("name", ["quickstart.ipynb", "codes.ipynb"])
def test_notebook_outputs_are_stripped(name):
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name}: strip the outputs"


@pytest.mark.parametrize("name, min_figures", [("quickstart.ipynb", 4), ("codes.ipynb", 2)])
def test_notebook_executes_and_draws(name, min_figures, tmp_path, monkeypatch):
  # `configs` is importable as it is after `pip install -e .` of this checkout.
  monkeypatch.setenv("PYTHONPATH", helpers.REPO)
  monkeypatch.setenv("BITS_PRESET", "test")
  monkeypatch.setenv("BITS_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("BITS_WEIGHTS", str(tmp_path / "run"))
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(
      notebook,
      timeout=600,
      kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}},  # the kernel's cwd
  )
  client.execute()
  assert _figures(notebook) >= min_figures
  assert not os.path.exists(tmp_path / "gs:")
