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


def _run_with_manifests(run, steps=(2, 4)):
  """A workdir whose checkpoint steps have their `bits_manifest.json` (as the trainer's);
  returns the teacher params of each step."""
  from bits_jax import checkpoint  # pylint: disable=g-import-not-at-top

  teachers = {}
  for step in steps:
    student, teacher = _tree(step), _tree(step + 100, with_stats=True)
    state = {
        "step": np.int32(step),
        "params": {k: student[k] for k in ("backbone", "head")},
        "teacher_params": {k: teacher[k] for k in ("backbone", "head")},
        "teacher_batch_stats": teacher["batch_stats"],
        "opt_state": {"mu": np.ones((64, 64), np.float32)},
    }
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(run / "checkpoints" / str(step) / "default", state)
    checkpoint.write_manifest(run / "checkpoints" / str(step), step)
    teachers[step] = teacher
  return teachers


def _truncate_arrays(step_dir):
  files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files
  for path in files:
    path.write_bytes(path.read_bytes()[:5])


def _files(run):
  return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_a_damaged_latest_step_is_skipped_and_left_in_place(tmp_path, caplog):
  run = tmp_path / "run"
  teachers = _run_with_manifests(run)
  _truncate_arrays(run / "checkpoints" / "4")
  before = _files(run)
  with caplog.at_level("WARNING"):
    loaded, step = weights.load_params(run)
  assert step == 2
  _assert_equal(loaded, teachers[2])
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "Checkpoint step 4" in messages and "truncated" in messages
  assert "Using checkpoint step 2" in messages and "[4]" in messages
  assert _files(run) == before  # nothing moved or deleted
  # The damaged step itself: an error naming it and what to do.
  with pytest.raises(weights.DamagedCheckpointError, match="step 4 .*damaged.*workdir"):
    weights.load_params(run / "checkpoints" / "4")
  # Every step damaged: one error naming them.
  _truncate_arrays(run / "checkpoints" / "2")
  with pytest.raises(weights.DamagedCheckpointError, match=r"Every checkpoint .*\[4, 2\]"):
    weights.load_params(run)
  assert _files(run) == before


def test_damage_without_a_manifest_is_found_by_the_restore(tmp_path):
  run = tmp_path / "run"
  teachers = _run_with_manifests(run)
  (run / "checkpoints" / "4" / "bits_manifest.json").unlink()
  _truncate_arrays(run / "checkpoints" / "4")
  loaded, step = weights.load_params(run)
  assert step == 2
  _assert_equal(loaded, teachers[2])


def test_only_the_network_asked_for_is_read(tmp_path, monkeypatch):
  run = tmp_path / "run"
  _run_with_manifests(run, steps=(2,))
  restored = []
  original = ocp.PyTreeCheckpointer.restore

  def spy(self, directory, *args, **kwargs):
    out = original(self, directory, *args, **kwargs)
    restored.append(sorted(out))
    return out

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
  weights.load_params(run)
  weights.load_params(run, which="student")
  # Not the optimizer state, nor the other network (this state has no student statistics).
  assert restored == [["teacher_batch_stats", "teacher_params"], ["params"]]


def test_a_workdir_without_checkpoints_says_train_first(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text("{}")
  for path in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
    with pytest.raises(
        weights.NoCheckpointError, match="No checkpoint yet in .*checkpoints: train"
    ):
      weights.load_params(path)
