"""The training loop end to end on the Fashion-MNIST test preset: resume and results."""

import json
import os

import jax
import numpy as np
import pytest

from bits_jax import checkpoint
from bits_jax import run_guard
from bits_jax import train
from bits_jax import train_state
from tests import helpers


@pytest.fixture(scope="module")
def config():
  return helpers.load_config("fashion_mnist", "test")


def test_resume_gives_same_params_as_uninterrupted(config, tmp_path):
  full = train.train(config, str(tmp_path / "full"))
  train.train(config, str(tmp_path / "resumed"), stop_at_step=3)
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
  resumed = train.train(config, str(tmp_path / "resumed"))
  assert int(full.step) == int(resumed.step) == config.total_steps
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
      jax.device_get(full.params),
      jax.device_get(resumed.params),
  )
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
      jax.device_get(full.teacher_params),
      jax.device_get(resumed.teacher_params),
  )


def test_resume_past_a_lowered_total_steps_says_so(config, tmp_path, capsys, monkeypatch):
  closed = []  # Each run releases its Orbax manager (a notebook's runs kept their threads).
  close = checkpoint.ocp.CheckpointManager.close
  monkeypatch.setattr(
      checkpoint.ocp.CheckpointManager, "close", lambda self: closed.append(close(self))
  )
  workdir = str(tmp_path / "run")
  config = config.copy_and_resolve_references()
  config.total_steps, config.objective.head.reset_every_steps = 3, 0
  train.train(config, workdir)
  config.total_steps, config.allow_config_change = 2, "total_steps"
  capsys.readouterr()
  state = train.train(config, workdir)
  assert int(state.step) == 3
  assert "Checkpoint step 3 in" in capsys.readouterr().out
  assert len(closed) == 2


def _scalar_steps(workdir, tag):
  """{step: value} of one scalar tag in the run's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  values = {}
  for name in sorted(os.listdir(workdir)):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.tag == tag:
            values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def test_no_nan_rate_for_a_logged_step_without_timed_steps(config, tmp_path, capsys):
  # The first step of a run (fresh or resumed) compiles and is not timed: with log_every=1
  # its rate was written as NaN.
  config = config.copy_and_resolve_references()
  config.total_steps, config.log_every, config.objective.head.reset_every_steps = 2, 1, 0
  train.train(config, str(tmp_path))
  rates = _scalar_steps(tmp_path, "steps_per_second")
  assert sorted(rates) == [2] and np.isfinite(rates[2]) and rates[2] > 0
  assert sorted(_scalar_steps(tmp_path, "loss")) == [1, 2]
  out = capsys.readouterr().out
  assert "step 1/2" in out and "? steps/s | ETA ?" in out and "nan steps/s" not in out


def test_train_and_evaluate_writes_results(config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = config.copy_and_resolve_references()
  config.profile_steps, config.profile_first_step = 2, 2  # a trace of steps 3-4
  evaluate_at_end, refused = train._evaluate_at_end, []  # pylint: disable=protected-access

  def evaluate_in_locked_workdir(*args):
    # A second run on the workdir is refused during the evaluation too, not only the training.
    with pytest.raises(run_guard.WorkdirError, match="in use by another run"):
      with run_guard.WorkdirLock(workdir):
        pass
    refused.append(True)
    return evaluate_at_end(*args)

  monkeypatch.setattr(train, "_evaluate_at_end", evaluate_in_locked_workdir)
  results = train.train_and_evaluate(config, workdir)
  assert refused
  traces = [
      f for _, _, files in os.walk(os.path.join(workdir, "plugins", "profile")) for f in files
  ]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  for key in ("knn_top1", "knn_top1_random_init", "knn_top1_pixels", "knn_top1_pixels_normalized"):
    assert 0.0 <= on_disk[key] <= 1.0
    assert on_disk[key] == results[key]
  # The pixel rows are the k-NN evaluator's protocol on the images: 10 classes, well above 1/10.
  assert results["knn_top1_pixels"] > 0.3
  # The demo's retrieval entry at the end, on the trained, random-init and pixel rows.
  for row in ("trained", "random_init", "pixels"):
    assert 0.0 < on_disk[f"{row}/retrieval/map_all"] <= 1.0
  assert "trained/retrieval/codes/32/map_all" in on_disk  # the test preset's 32-bit messages
  assert not any(k.startswith("pixels/retrieval/codes") for k in on_disk)  # pixels: no code
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_failing_evaluator_keeps_the_metrics_before_it(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.total_steps, config.baseline_pixels = 2, False
  config.objective.head.reset_every_steps = 0
  config.evals = dict(
      knn=dict(config.evals.knn.to_dict(), every=0, at_end=True),
      # Entries run in key order: this one after the k-NN.
      zz_broken=dict(type=helpers.failing_evaluator(), every=0, at_end=True),
  )
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="evaluator broke"):
    train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "results.json").exists()  # only a finished evaluation writes it
  on_disk = json.loads((workdir / "results_incomplete.json").read_text())
  # The trained model's k-NN ran before the failure and is kept; the failure is named.
  assert 0.0 < on_disk["trained/knn/knn_top1_k20"] <= 1.0
  assert (
      on_disk["failed"] == "evals.zz_broken: RuntimeError: evaluator broke (on the trained model)"
  )
  assert (workdir / "checkpoints" / "2").exists()  # and the training is kept


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
def test_random_init_baseline_is_another_draw_with_its_batch_stats(backbone):
  config = helpers.load_config("fashion_mnist", f"test,backbone={backbone}")
  components = train_state.build(config)
  baseline = train_state.random_init_variables(config, components)
  again = train_state.random_init_variables(config, components)
  trained_init = train_state.create(components, config, jax.random.PRNGKey(config.seed))
  leaves = lambda tree: jax.tree_util.tree_leaves(jax.device_get(tree))
  assert all(np.array_equal(a, b) for a, b in zip(leaves(baseline), leaves(again)))
  assert sorted(baseline) == (
      ["backbone", "batch_stats", "head"] if backbone == "resnet18" else ["backbone", "head"]
  )
  # Not the run's own init: every weight matrix is another draw than the trained model's start.
  kernels = lambda tree: {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
      if "kernel" in jax.tree_util.keystr(path)
  }
  for part in ("backbone", "head"):
    ours, trained = kernels(baseline[part]), kernels(trained_init.params[part])
    assert ours and sorted(ours) == sorted(trained)
    assert not any(np.array_equal(ours[k], trained[k]) for k in ours)
