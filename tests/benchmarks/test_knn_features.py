"""benchmarks/knn_features.py: the read-outs, and its CLS row equals the k-NN evaluator's."""

import os
import sys

import numpy as np
import pytest

import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "benchmarks"))
import knn_features  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_read_outs_shapes_grid_order_and_unit_halves():
  rng = np.random.default_rng(0)
  outputs = {
      "cls": rng.standard_normal((5, 3)).astype(np.float32),
      "cls_last4": rng.standard_normal((5, 12)).astype(np.float32),
      "patch_tokens": rng.standard_normal((5, 4, 3)).astype(np.float32),
  }
  outs = knn_features.read_outs(outputs)
  assert {k: v.shape for k, v in outs.items()} == {
      "cls": (5, 3),
      "cls_last4": (5, 12),
      "mean_patch": (5, 3),
      "cls+mean_patch": (5, 6),
      "patch_tokens": (5, 12),
  }
  np.testing.assert_array_equal(outs["patch_tokens"][:, 3:6], outputs["patch_tokens"][:, 1])
  np.testing.assert_allclose(outs["mean_patch"], outputs["patch_tokens"].mean(1), rtol=1e-6)
  halves = outs["cls+mean_patch"].reshape(5, 2, 3)
  np.testing.assert_allclose(np.linalg.norm(halves, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      halves[:, 0] * np.linalg.norm(outputs["cls"], axis=-1, keepdims=True),
      outputs["cls"],
      rtol=1e-5,
  )


def test_cls_row_equals_the_knn_evaluator(tmp_path, monkeypatch, capsys):
  import jax  # pylint: disable=g-import-not-at-top
  from bits_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from bits_jax import train  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import run as run_lib  # pylint: disable=g-import-not-at-top

  config = helpers.load_config("fashion_mnist", "test")
  config.evals.knn.ks = (20,)
  workdir = tmp_path / "run"
  workdir.mkdir()
  # A workdir as a run leaves it, without the cost of compiling a train step: the teacher
  # moved off the initial weights, so that it differs from the random-init column.
  _, state = helpers.create_state(config)
  teacher = jax.tree_util.tree_map(lambda x: x * 1.5, state.teacher_params)
  train._store_config(config, workdir)  # pylint: disable=protected-access
  with checkpoint_lib.Checkpoints(workdir, config) as checkpoints:
    checkpoints.save(1, state.replace(step=1, teacher_params=teacher))
  expected = run_lib.evaluate(
      config, weights=workdir, out_dir=str(tmp_path / "eval"), names=("knn",)
  )["knn/knn_top1_k20"]

  monkeypatch.setattr(
      sys, "argv", ["knn_features.py", f"--workdir={workdir}", "--models=teacher,random_init"]
  )
  knn_features.main()
  table, pixels = capsys.readouterr().out.split("| read-out |", 1)[1].split("\nraw pixels: ")
  cells = {row.split("|")[1].strip(): row.split("|")[2:-1] for row in table.splitlines()[2:]}
  assert list(cells) == ["cls", "cls_last4", "mean_patch", "cls+mean_patch", "patch_tokens"]
  assert all(len(row) == 3 for row in cells.values())  # dims, teacher, random_init
  assert 0 < float(pixels) <= 100
  assert float(cells["cls"][1]) == pytest.approx(100 * expected, abs=0.006)
  assert int(cells["patch_tokens"][0]) == 16 * config.model.width  # 28 px, patch 7


def test_unknown_model_names_the_choices(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["knn_features.py", f"--workdir={tmp_path}", "--models=x"])
  with pytest.raises(SystemExit, match="teacher, student, random_init"):
    knn_features.main()


def test_missing_workdir_config_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["knn_features.py", f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit, match="give the workdir of a run"):
    knn_features.main()
