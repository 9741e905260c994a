"""`python -m bits_jax.evaluate` as a user runs it: relative paths, WORKDIR/config.json."""

import json
import os
import subprocess
import sys

import pytest

from bits_jax import train
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(base dir, workdir relative to it) of 3 steps of the test preset with a narrower ViT.

  The width differs from configs/fashion_mnist.py:test, so evaluating with that file's
  config instead of WORKDIR/config.json fails on the parameter shapes.
  """
  config = helpers.load_config("fashion_mnist", "test")
  config.model.width = 16
  for entry in config.evals.values():
    entry.at_end = False
  base = str(tmp_path_factory.mktemp("cli"))
  train.train(config, os.path.join(base, "runs", "r"), stop_at_step=3)
  return base, os.path.join("runs", "r")


def _evaluate(cwd: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)  # the 8 fake devices of conftest are inherited
  return subprocess.run(
      [sys.executable, "-m", "bits_jax.evaluate", *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


def _results(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def test_relative_workdir_uses_its_config_json(trained_run):
  base, workdir = trained_run
  proc = _evaluate(base, f"--workdir={workdir}", "--evals=knn")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = _results(os.path.join(base, workdir, "eval", "results.json"))
  assert results["step"] == 3 and results["weights"] == os.path.join(base, workdir)
  # The stored config's k-NN entry (the test preset's ks), and nothing but k-NN.
  metrics = {k for k in results if "/" in k}
  assert {f"knn/knn_top1_k{k}" for k in (10, 20, 100, 200)} <= metrics
  assert all(k.startswith("knn/") for k in metrics), metrics
  assert 0.0 <= results["knn/knn_top1_k20"] <= 1.0
  assert os.path.exists(os.path.join(base, workdir, "eval", "results.md"))


def test_overrides_with_config_file_go_on_top_of_config_json(trained_run):
  base, workdir = trained_run
  rel_workdir = os.path.relpath(os.path.join(base, workdir), REPO)
  rel_out = os.path.relpath(os.path.join(base, "eval_k5"), REPO)
  proc = _evaluate(
      REPO,
      "--config=configs/fashion_mnist.py:test",
      "--config.evals.knn.ks=(5,)",
      f"--workdir={rel_workdir}",
      "--evals=knn",
      f"--out={rel_out}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = _results(os.path.join(base, "eval_k5", "results.json"))
  assert sorted(k for k in results if "/" in k) == ["knn/knn_top1_k5", "knn/knn_top5_k5"]


@pytest.mark.parametrize(
    "args,message",
    [
        (("--evals=knnn,knn",), "--evals=knnn: not in config.evals; use some of"),
        (("--workdir=nowhere",), "No config.json in --workdir="),
    ],
)
def test_bad_arguments_fail_before_evaluating(trained_run, args, message):
  base, workdir = trained_run
  results_file = os.path.join(base, workdir, "eval", "results.json")
  before = os.path.getmtime(results_file) if os.path.exists(results_file) else None
  if not any(a.startswith("--workdir") for a in args):
    args = (f"--workdir={workdir}",) + args
  proc = _evaluate(base, *args)
  assert proc.returncode != 0
  assert message in proc.stdout + proc.stderr, proc.stderr[-3000:]
  after = os.path.getmtime(results_file) if os.path.exists(results_file) else None
  assert before == after  # no results written
