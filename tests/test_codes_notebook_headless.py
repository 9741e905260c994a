"""notebooks/codes.ipynb on converted weights without a projection head: it explains and
skips the code analysis instead of failing (executed with nbclient, like test_notebooks)."""

import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bits_jax import weights
from bits_jax.models import resnet
from bits_jax.tools import convert

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _converted_resnet(tmp_path):
  """What `bits_jax.tools.convert` writes for a backbone-only ResNet-18 (width 4, 1 channel)."""
  model = resnet.ResNet(block="basic", stage_sizes=(2, 2, 2, 2), width=4, small_stem=True)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  source = weights.save_params(
      tmp_path / "src",
      {"backbone": variables["params"], "batch_stats": {"backbone": variables["batch_stats"]}},
  )
  out = tmp_path / "converted"
  convert.convert("flax", str(source), str(out), "resnet18")
  return out


def test_codes_notebook_without_head_skips_the_code_analysis(tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", helpers.REPO)
  monkeypatch.setenv("BITS_WEIGHTS", str(_converted_resnet(tmp_path)))
  notebook = nbformat.read(os.path.join(helpers.REPO, "notebooks", "codes.ipynb"), as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError on a failing cell
  text = "".join(
      output.get("text", "")
      for cell in notebook.cells
      if cell.cell_type == "code"
      for output in cell.get("outputs", [])
  )
  assert "head: no" in text
  assert "no projection head" in text and "code analysis below is skipped" in text
  assert text.count("No head, no codes: skipped") == 2
