"""`gs://` workdirs end to end, on a fake object store (tests/fake_gcs.py, never a bucket).

What is covered: every path the run builds goes through etils.epath / Orbax / CLU with the
`gs://` URL (no local `./gs:/` directory); Orbax's object-store commit (commit_success.txt),
TensorStore's data files, manifests, config.json, train_speed.json, results, figures and
TensorBoard events land in the fake bucket; a run resumes from there; the lock object, the
incomplete-write cleanup and the quarantine copy work without rename or flock. Not covered:
GCS itself (latency, eventual listing, TensorFlow's GCS file system for TensorBoard).
"""

import datetime
import json
import os

import fake_gcs
import helpers
import pytest

from bits_jax import checkpoint as checkpoint_lib
from bits_jax import run_guard
from bits_jax import train
from bits_jax.evaluate import run as run_lib

URL = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(root of the fake store, cwd): `gs://bucket/x` is `root/bucket/x`; cwd must stay empty."""
  root, cwd = tmp_path / "store", tmp_path / "cwd"
  root.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with fake_gcs.fake_gcs(str(root)):
    yield root, cwd
  assert not os.listdir(cwd), f"files written to the local cwd: {os.listdir(cwd)}"


def test_train_writes_and_resumes_checkpoints_in_the_bucket(bucket, capsys):
  root, _ = bucket
  config = helpers.load_config("fashion_mnist", "test")
  train.train(config, URL, stop_at_step=3)
  run = root / "bucket" / "run"
  step_dir = run / "checkpoints" / "3"
  assert (step_dir / "commit_success.txt").exists()  # Orbax's object-store commit, no rename
  manifest = json.loads((step_dir / checkpoint_lib.MANIFEST).read_text())
  assert manifest["step"] == 3 and manifest["total_bytes"] > 0
  assert checkpoint_lib.manifest_problem(f"{URL}/checkpoints/3") is None
  assert json.loads((run / "config.json").read_text())["total_steps"] == config.total_steps
  assert not (run / run_guard.LOCK_FILE).exists()  # released
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(run))
  capsys.readouterr()

  state = train.train(config, URL)
  assert int(state.step) == config.total_steps
  assert "Resuming from checkpoint step 3" in capsys.readouterr().out
  assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
  assert json.loads((run / "train_speed.json").read_text())["steps"] == 2


def _write_tree(root, files):
  for rel, data in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def test_manifest_detects_damage_and_quarantine_copies(bucket):
  root, _ = bucket
  local = root / "bucket" / "w" / "checkpoints" / "7"
  _write_tree(local, {"commit_success.txt": b"", "default/d/abc": b"x" * 100, "a": b"1"})
  checkpoint_lib.write_manifest("gs://bucket/w/checkpoints/7", 7)
  assert checkpoint_lib.manifest_problem("gs://bucket/w/checkpoints/7") is None
  (local / "default" / "d" / "abc").write_bytes(b"y" * 100)
  problem = checkpoint_lib.manifest_problem("gs://bucket/w/checkpoints/7")
  assert "SHA-256" in problem

  from etils import epath  # pylint: disable=g-import-not-at-top

  checkpoint_lib._move_tree(  # pylint: disable=protected-access
      epath.Path("gs://bucket/w/checkpoints/7"), epath.Path("gs://bucket/w/corrupt/7-x")
  )
  assert not local.exists()
  moved = root / "bucket" / "w" / "corrupt" / "7-x"
  assert (moved / "default" / "d" / "abc").read_bytes() == b"y" * 100
  assert (moved / checkpoint_lib.MANIFEST).exists()


def test_incomplete_object_store_step_is_removed(bucket, capsys):
  root, _ = bucket
  directory = root / "bucket" / "w" / "checkpoints"
  _write_tree(directory, {"4/commit_success.txt": b"", "4/a": b"1", "8/default/a": b"2"})
  assert checkpoint_lib.remove_incomplete_writes("gs://bucket/w/checkpoints") == ["8"]
  assert sorted(os.listdir(directory)) == ["4"]
  assert "incomplete checkpoint write gs://bucket/w/checkpoints/8" in capsys.readouterr().out


def test_lock_object_is_exclusive_released_and_taken_over_when_stale(bucket, capsys):
  root, _ = bucket
  lock_path = root / "bucket" / "w" / run_guard.LOCK_FILE
  run_guard.check_writable("gs://bucket/w")
  with run_guard.WorkdirLock("gs://bucket/w"):
    assert "heartbeat" in lock_path.read_text()
    with pytest.raises(run_guard.WorkdirError, match="in use by another run"):
      run_guard.WorkdirLock("gs://bucket/w").__enter__()
  assert not lock_path.exists()

  old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
  lock_path.write_text(f"pid 1 on gone, started x; heartbeat {old.isoformat()}\n")
  with run_guard.WorkdirLock("gs://bucket/w"):
    assert "pid 1 on gone" not in lock_path.read_text()
  assert "Taking over the lock" in capsys.readouterr().out


def test_write_results_and_figures_to_the_bucket(bucket):
  root, _ = bucket
  with run_lib.local_figure_dir("gs://bucket/w/eval") as figures:
    assert "://" not in figures and os.path.isdir(figures)
    png = os.path.join(figures, "bit_balance.png")
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    plt.figure(figsize=(1, 1))
    plt.savefig(png)
    plt.close("all")
    run_lib.write_results({"step": 2, "knn/top1": 0.5}, "gs://bucket/w/eval", step=2, plots=[png])
  out = root / "bucket" / "w" / "eval"
  assert json.loads((out / "results.json").read_text())["knn/top1"] == 0.5
  assert "knn/top1" in (out / "results.md").read_text()
  assert (out / "bit_balance.png").read_bytes()[:4] == b"\x89PNG"
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(out))
