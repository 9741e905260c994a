"""Resolving and loading weights: params directories, train checkpoints, relative paths."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bits_jax import weights


def _tree(seed, with_stats=False):
  rng = np.random.RandomState(seed)
  tree = {
      "backbone": {"dense": {"kernel": rng.randn(3, 4).astype(np.float32)}},
      "head": {"out": {"bias": rng.randn(4).astype(np.float32)}},
  }
  if with_stats:
    tree["batch_stats"] = {"backbone": {"bn": {"mean": rng.randn(4).astype(np.float32)}}}
  return tree


def _assert_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_params_directory_round_trip_with_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Orbax refuses relative paths: they are made absolute
  tree = _tree(0, with_stats=True)
  written = weights.save_params("converted", tree, {"model": "vit_tiny"})
  assert written == tmp_path / "converted"
  loaded, step = weights.load_params("converted")
  assert step is None
  _assert_equal(loaded, tree)
  assert weights.read_meta("converted") == {"model": "vit_tiny"}
  # Empty BatchNorm statistics are not written; no meta reads as {}.
  weights.save_params("plain", {"backbone": tree["backbone"], "batch_stats": {}})
  loaded, _ = weights.load_params("plain")
  assert set(loaded) == {"backbone"}
  assert weights.read_meta("plain") == {}
  with pytest.raises(ValueError, match="'backbone' entry"):
    weights.save_params("bad", {"params": tree["backbone"]})


def test_train_checkpoint_latest_complete_step_teacher_or_student(tmp_path):
  run = tmp_path / "run"
  student, teacher = _tree(1, with_stats=True), _tree(2, with_stats=True)
  state = {
      "step": np.int32(0),
      "params": {k: student[k] for k in ("backbone", "head")},
      "teacher_params": {k: teacher[k] for k in ("backbone", "head")},
      "batch_stats": student["batch_stats"],
      "teacher_batch_stats": teacher["batch_stats"],
  }
  with ocp.StandardCheckpointer() as checkpointer:
    for step in (2, 4):
      checkpointer.save(run / "checkpoints" / str(step) / "default", state)
  (run / "checkpoints" / "6").mkdir()  # a step still being written: no 'default' item
  (run / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir()

  loaded, step = weights.load_params(run)
  assert step == 4
  _assert_equal(loaded, teacher)
  loaded, step = weights.load_params(run / "checkpoints" / "2", which="student")
  assert step == 2
  _assert_equal(loaded, student)
  _, step = weights.load_params(run / "checkpoints" / "2" / "default")
  assert step == 2
  with pytest.raises(ValueError, match="'teacher' or 'student'"):
    weights.load_params(run, which="ema")


def test_unusable_paths_say_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.load_params(tmp_path / "nope")
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="bits_jax.tools.convert"):
    weights.resolve_checkpoint(tmp_path / "model.safetensors")
  (tmp_path / "run" / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
    weights.resolve_checkpoint(tmp_path / "run")
