"""bits_jax.compare: per-method configs from one file, overrides, the Markdown table."""

import json
import os

import pytest

from bits_jax import compare
from bits_jax import run_guard
from tests import fake_gcs
from tests import helpers

URL = "gs://bucket/cmp"


@pytest.mark.parametrize("method", ["bits", "dino", "simdino"])
def test_same_budget_one_key_apart(method):
  base = helpers.load_config("fashion_mnist", "test")
  overridden = base.copy_and_resolve_references()
  overridden.total_steps = 3
  overridden.optim.learning_rate = 5e-4
  config = compare.method_config(overridden, method)
  assert config.objective.name == method and config.total_steps == 3
  assert config.optim.learning_rate == 5e-4
  assert base.objective.name == "bits"  # the caller's config is not modified
  for key in ("model", "input", "evals"):
    assert config[key].to_dict() == base[key].to_dict(), key
  for key in ("warmup_steps", "teacher_momentum"):
    assert config.optim[key] == base.optim[key], key
  resets = config.objective.head.reset_every_steps
  assert (resets == base.objective.head.reset_every_steps) if method == "bits" else resets == 0


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown method 'byol'"):
    compare.method_config(helpers.load_config("fashion_mnist", "test"), "byol")
  config = helpers.load_config("fashion_mnist", "test")
  config.evals.knn.at_end = False
  with pytest.raises(ValueError, match="keep config.evals.knn.at_end=True"):
    compare.compare(config, ["bits"], "/nonexistent")


def test_markdown_table():
  rows = [
      {
          "method": "bits",
          "knn_top1": 0.8123,
          "knn_top1_random_init": 0.7,
          "knn_k": 20,
          "step": 800,
          "steps_per_second": 1.234,
          "wall_seconds": 600.0,
      },
      {
          "method": "dino",
          "knn_top1": 0.75,
          "knn_top1_random_init": 0.7,
          "knn_k": 20,
          "step": 800,
          "wall_seconds": 610.4,
      },
  ]
  table = compare.markdown_table(rows).splitlines()
  assert table[0].startswith("| method | k-NN top-1 (k=20) |")
  assert table[2] == "| bits | 81.23% | 70.00% | 800 | 1.23 | 600 |"
  assert table[3] == "| dino | 75.00% | 70.00% | 800 | n/a | 610 |"


def test_method_variants_of_the_presets():
  base = helpers.load_config("fashion_mnist", "test")
  fixed = compare.method_config(base, "bits_fixed")
  cosine = compare.method_config(base, "bits_cosine")
  assert fixed.objective.name == cosine.objective.name == "bits"
  assert fixed.objective.head.reset_every_steps == 0
  assert cosine.objective.bits.agreement == "cosine"


def test_a_method_preset_under_reset_rows_is_refused(tmp_path):
  config = helpers.load_config("fashion_mnist", "test,dino")  # resets off
  with pytest.raises(ValueError, match="--methods=bits re-initialise the head.*:test,dino"):
    compare.compare(config, ["bits", "dino"], str(tmp_path))
  assert not os.listdir(tmp_path)


def test_compare_writes_to_a_gs_workdir(tmp_path, monkeypatch):
  """Every file through epath: on gs:// nothing lands in a local ./gs: directory."""
  root, cwd = tmp_path / "store", tmp_path / "cwd"
  root.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def fake_run(config, run_dir):  # what train_and_evaluate leaves, without the training
    run_guard.workdir_path(run_dir).mkdir(parents=True)
    (run_guard.workdir_path(run_dir) / "train_speed.json").write_text('{"steps_per_second": 2}')
    rows = dict(knn_top1=0.8, knn_top1_random_init=0.7, knn_k=20, step=config.total_steps)
    return rows

  monkeypatch.setattr(compare.train, "train_and_evaluate", fake_run)
  with fake_gcs.fake_gcs(str(root)):
    rows = compare.compare(helpers.load_config("fashion_mnist", "test"), ["bits", "dino"], URL)
  assert [r["steps_per_second"] for r in rows] == [2, 2]
  assert "| dino | 80.00% | 70.00% |" in (root / "bucket" / "cmp" / "compare.md").read_text()
  assert json.loads((root / "bucket" / "cmp" / "compare.json").read_text())["methods"] == [
      "bits",
      "dino",
  ]
  assert not os.listdir(cwd)
