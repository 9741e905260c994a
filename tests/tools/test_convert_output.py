"""The converter never deletes what is at --out unless it is an earlier export of ours."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bits_jax import weights
from bits_jax.models import resnet
from bits_jax.tools import convert

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # safetensors and params dirs need no torch


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A params directory of a ResNet-18 of width 4 (small stem, 1 channel)."""
  model = resnet.ResNet(block="basic", stage_sizes=(2, 2, 2, 2), width=4, small_stem=True)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  params = {"backbone": variables["params"], "batch_stats": {"backbone": variables["batch_stats"]}}
  return weights.save_params(tmp_path_factory.mktemp("src") / "src", params)


def _workdir(path):
  """What a training run leaves: checkpoints/, config.json, results."""
  (path / "checkpoints" / "6" / "default").mkdir(parents=True)
  (path / "checkpoints" / "6" / "default" / "_METADATA").write_text("{}")
  (path / "config.json").write_text("{}")
  (path / "eval").mkdir()
  (path / "eval" / "results.json").write_text("{}")
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _convert(source, out):
  return convert.cli(["--from=flax", f"--in={source}", "--arch=resnet18", f"--out={out}"])


def test_a_run_workdir_or_other_directory_is_never_replaced(source, tmp_path):
  run = tmp_path / "run"
  files = _workdir(run)
  with pytest.raises(FileExistsError, match="checkpoints and config.json.*Pick a new output"):
    _convert(source, run)
  assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == files
  # Only config.json (a run before its first checkpoint), or foreign files: refused too.
  (tmp_path / "early").mkdir()
  (tmp_path / "early" / "config.json").write_text("{}")
  (tmp_path / "early" / weights.META_FILE).write_text("{}")
  with pytest.raises(FileExistsError, match="config.json"):
    _convert(source, tmp_path / "early")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not an earlier params export"):
    _convert(source, tmp_path / "mine")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  # save_params itself refuses too (not only the command line).
  with pytest.raises(FileExistsError, match="delete it yourself"):
    weights.save_params(run, weights.load_params(source)[0])
  assert (run / "config.json").exists() and (run / "eval" / "results.json").exists()


def test_an_earlier_export_or_empty_directory_is_replaced(source, tmp_path):
  out = tmp_path / "out"
  assert _convert(source, out) == 0
  meta = weights.read_meta(out)
  assert meta["model"] == "resnet18" and meta["resnet_width"] == 4
  assert _convert(source, out) == 0  # the same command again: replaces its own export
  assert weights.read_meta(out) == meta
  (tmp_path / "empty").mkdir()
  assert _convert(source, tmp_path / "empty") == 0
  assert weights.read_meta(tmp_path / "empty") == meta


def test_file_outputs_replace_a_file_but_never_a_directory(source, tmp_path):
  file = tmp_path / "r18.safetensors"
  assert _convert(source, file) == 0
  first = convert.read_safetensors(file)
  assert _convert(source, file) == 0  # an earlier export
  second = convert.read_safetensors(file)
  assert sorted(second) == sorted(first)
  jax.tree_util.tree_map(np.testing.assert_array_equal, second, first)
  (tmp_path / "dir.safetensors").mkdir()
  (tmp_path / "dir.safetensors" / "x").write_text("keep me")
  with pytest.raises(FileExistsError, match="directory is never replaced"):
    _convert(source, tmp_path / "dir.safetensors")
  assert (tmp_path / "dir.safetensors" / "x").read_text() == "keep me"
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(FileExistsError, match="is a file"):
    _convert(source, tmp_path / "file")


def test_cli_refusal_is_one_line_and_exit_1(source, tmp_path):
  run = tmp_path / "run"
  files = _workdir(run)
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "bits_jax.tools.convert",
          "--from=flax",
          f"--in={source}",
          "--arch=resnet18",
          f"--out={run}",
      ],
      capture_output=True,
      text=True,
      check=False,
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 1, proc.stderr
  assert "convert: Refusing to write into" in proc.stderr and "--out" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == files
