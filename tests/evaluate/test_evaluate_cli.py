"""`python -m bits_jax.evaluate` as a user runs it: relative paths, WORKDIR/config.json."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
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


def test_weights_with_config_json_need_no_config(trained_run, tmp_path):
  """--weights of a run (here its step directory): the run's config.json is found above it."""
  base, workdir = trained_run
  step_dir = os.path.join(base, workdir, "checkpoints", "3")
  proc = _evaluate(base, f"--weights={step_dir}", f"--out={tmp_path / 'e'}", "--evals=knn")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = _results(str(tmp_path / "e" / "results.json"))
  assert results["step"] == 3 and "knn/knn_top1_k20" in results


def test_weights_without_config_json_name_the_paths_searched(tmp_path):
  from bits_jax import weights  # pylint: disable=g-import-not-at-top

  bare = weights.save_params(tmp_path / "a" / "b" / "bare", {"backbone": {"w": np.zeros(2)}})
  proc = _evaluate(str(tmp_path), f"--weights={bare}", "--evals=knn")
  assert proc.returncode != 0
  assert f"No config.json in --weights={bare} (searched {bare}, " in proc.stderr, proc.stderr
  assert "pass --config=FILE.py" in proc.stderr


def _copy_run(trained_run, dest):
  base, workdir = trained_run
  shutil.copytree(os.path.join(base, workdir), dest, ignore=shutil.ignore_patterns("eval"))
  return dest


def _tree_files(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_damaged_latest_checkpoint_evaluates_the_newest_intact_one(trained_run, tmp_path):
  """Step 5 (a copy of step 3) is truncated: step 3 is evaluated, step 5 left as it is."""
  run = _copy_run(trained_run, tmp_path / "run")
  shutil.copytree(run / "checkpoints" / "3", run / "checkpoints" / "5")
  for path in (run / "checkpoints" / "5" / "default").rglob("*"):
    if path.is_file() and "/d/" in str(path):
      path.write_bytes(path.read_bytes()[:10])
  before = _tree_files(run)
  proc = _evaluate(str(tmp_path), "--workdir=run", "--evals=knn", f"--out={tmp_path / 'e'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Checkpoint step 5 in" in proc.stderr and "truncated" in proc.stderr, proc.stderr
  assert "Using checkpoint step 3" in proc.stderr and "left in place: [5]" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert _results(str(tmp_path / "e" / "results.json"))["step"] == 3
  assert _tree_files(run) == before  # the evaluator moves and deletes nothing
  # Only damaged checkpoints: one clear error line, no traceback.
  for path in (run / "checkpoints" / "3" / "default").rglob("*"):
    if path.is_file() and "/d/" in str(path):
      path.write_bytes(path.read_bytes()[:10])
  proc = _evaluate(str(tmp_path), "--workdir=run", "--evals=knn", f"--out={tmp_path / 'e2'}")
  assert proc.returncode == 1
  assert "evaluate: Every checkpoint in" in proc.stderr and "[5, 3]" in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_no_checkpoint_yet_says_train_first(trained_run, tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  shutil.copy(os.path.join(trained_run[0], trained_run[1], "config.json"), run)
  proc = _evaluate(str(tmp_path), "--workdir=run", "--evals=knn")
  assert proc.returncode == 1
  assert f"evaluate: No checkpoint yet in {run / 'checkpoints'}: train first" in proc.stderr
  assert "--weights" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (run / "eval").exists()


def test_new_config_keys_can_be_overridden(trained_run, tmp_path):
  """`--config.evals.linear.hidden_dim` is not in the config file: it is added (absl) and
  set on the stored config.json's section (run_config)."""
  base, workdir = trained_run
  args = [
      "--config=configs/fashion_mnist.py:test",
      "--config.evals.linear.hidden_dim=8",
      f"--workdir={os.path.join(base, workdir)}",
  ]
  code = (
      "import sys; from absl import flags; from bits_jax.evaluate import __main__ as m; "
      "flags.FLAGS(sys.argv); c = m.run_config(flags.FLAGS.workdir); "
      "print('hidden_dim', c.evals.linear.hidden_dim, c.model.width)"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
      env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "hidden_dim 8 16" in proc.stdout  # width 16: the stored config.json's model
  proc = _evaluate(REPO, *args, "--evals=linear", f"--out={tmp_path / 'e'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "linear/linear_top1" in _results(str(tmp_path / "e" / "results.json"))
