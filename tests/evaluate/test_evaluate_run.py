"""run.evaluate on a real (tiny) checkpoint, weight loading and adaptation, init_from."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bits_jax import train
from bits_jax import train_state
from bits_jax import weights
from bits_jax.evaluate import run
from tests import helpers


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(config, workdir) of 3 steps of the test preset (no evaluation during training)."""
  config = helpers.load_config("fashion_mnist", "test")
  for entry in config.evals.values():
    entry.at_end = False
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train(config, workdir, stop_at_step=3)
  return config, workdir


def _eval_config(config):
  """Every registered evaluator of the defaults, sized for seconds on a CPU."""
  config = config.copy_and_resolve_references()
  config.evals.knn.ks = (10, 20)
  config.evals.linear.epochs = 3
  config.evals.dense.num_images = 16
  with config.evals.codes.unlocked():
    config.evals.codes.tsne = False  # t-SNE costs seconds per hundred points
  return config


def test_evaluate_writes_every_result(trained_run, tmp_path):
  config, workdir = trained_run
  config = _eval_config(config)
  out = str(tmp_path / "eval")
  results = run.evaluate(config, weights=workdir, out_dir=out)
  assert results["step"] == 3 and results["which"] == "teacher"
  assert results["method"] == "bits" and results["dataset"] == "fashion_mnist"
  for key in (
      "knn/knn_top1_k10",
      "knn/knn_top1_k20",
      "linear/linear_top1",
      "retrieval/map_all",
      "retrieval/codes/32/map_all",
      "codes/bit_balance_mean",
      "dense/seg_miou",
      "geometry/explained@10",
  ):
    assert 0.0 <= results[key] <= 1.0, (key, results[key])
  # A 3-step model is far from chance (10 classes) on k-NN and the synthetic squares.
  assert results["knn/knn_top1_k20"] > 0.2 and results["dense/seg_miou"] > 0.5
  assert results["codes/num_bits"] == config.objective.bits.num_bits
  assert 1.0 <= results["geometry/d_eff"] <= config.model.width
  with open(os.path.join(out, "results.json")) as f:
    stored = json.load(f)
  assert stored["knn/knn_top1_k20"] == results["knn/knn_top1_k20"]
  assert set(stored) == set(results)
  with open(os.path.join(out, "results.md")) as f:
    assert "| knn/knn_top1_k20 |" in f.read()
  files = set(os.listdir(out))
  assert {
      "bit_balance.png",
      "bit_correlation.png",
      "class_bit_activation.png",
      "retrieval_precision.png",
      "retrieval_map_vs_bits.png",
      "explained_variance.png",
      "eigenvalues.csv",
  } <= files, files
  assert any(f.startswith("events.out.tfevents") for f in files)


def test_evaluate_names_and_student(trained_run, tmp_path):
  """`names` picks config.evals entries; which='student' evaluates the other network."""
  config, workdir = trained_run
  config = _eval_config(config)
  teacher = run.evaluate(config, weights=workdir, out_dir=str(tmp_path / "t"), names=("knn",))
  student = run.evaluate(
      config,
      weights=os.path.join(workdir, "checkpoints", "3"),
      out_dir=str(tmp_path / "s"),
      names=("knn",),
      which="student",
  )
  for results in (teacher, student):
    assert sorted(k for k in results if "/" in k) == [
        "knn/knn_top1_k10",
        "knn/knn_top1_k20",
        "knn/knn_top5_k10",
        "knn/knn_top5_k20",
    ]
  assert student["which"] == "student" and student["step"] == 3
  assert os.listdir(tmp_path / "s") and not any(
      f.endswith(".png") for f in os.listdir(tmp_path / "s")
  )


def test_failing_evaluator_leaves_results_json_and_keeps_the_rest(trained_run, tmp_path):
  config, workdir = trained_run
  config = _eval_config(config)
  out = tmp_path / "eval"
  complete = run.evaluate(config, weights=workdir, out_dir=str(out), names=("knn",))
  before = (out / "results.json").read_text()
  with config.unlocked():
    config.evals.zz_broken = dict(type=helpers.failing_evaluator(), every=0, at_end=False)
  with pytest.raises(RuntimeError, match="evaluator broke"):
    run.evaluate(config, weights=workdir, out_dir=str(out), names=("knn", "zz_broken"))
  assert (out / "results.json").read_text() == before  # the earlier complete run's
  partial = json.loads((out / "results_incomplete.json").read_text())
  assert partial["knn/knn_top1_k20"] == complete["knn/knn_top1_k20"]
  assert partial["failed"] == "evals.zz_broken: RuntimeError: evaluator broke"
  # A later complete evaluation replaces the partial one.
  run.evaluate(config, weights=workdir, out_dir=str(out), names=("knn",))
  assert not (out / "results_incomplete.json").exists() and (out / "results.json").exists()


def test_load_params_from_workdir_step_dir_and_params_dir(trained_run, tmp_path):
  _, workdir = trained_run
  from_workdir, step = weights.load_params(workdir)
  from_step, step2 = weights.load_params(os.path.join(workdir, "checkpoints", "3"))
  assert step == step2 == 3
  assert set(from_workdir) == {"backbone", "head"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_workdir, from_step)
  student, _ = weights.load_params(workdir, "student")
  assert jax.tree_util.tree_structure(student) == jax.tree_util.tree_structure(from_workdir)
  params_dir = str(tmp_path / "params")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, {"backbone": from_workdir["backbone"]})
  only_backbone, step3 = weights.load_params(params_dir)
  assert step3 is None and set(only_backbone) == {"backbone"}
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, only_backbone["backbone"], from_workdir["backbone"]
  )
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.load_params(str(tmp_path / "nope"))


def test_rgb_to_gray_patch_embedding_is_exact():
  rng = np.random.RandomState(0)
  rgb_kernel = rng.randn(4, 4, 3, 8).astype(np.float32)
  target = jax.ShapeDtypeStruct((4, 4, 1, 8), np.float32)
  gray_kernel = weights.adapt_params(
      {"patch_embed": {"kernel": rgb_kernel}}, {"patch_embed": {"kernel": target}}
  )
  gray_kernel = gray_kernel["patch_embed"]["kernel"]
  patch = rng.rand(4, 4, 1).astype(np.float32)
  np.testing.assert_allclose(
      np.einsum("hwc,hwco->o", np.repeat(patch, 3, -1), rgb_kernel),
      np.einsum("hwc,hwco->o", patch, gray_kernel),
      rtol=1e-5,
  )


def test_pos_embed_resized_and_mismatch_named():
  loaded = {
      "pos_embed": np.random.randn(1, 16, 8).astype(np.float32),
      "dense": {"kernel": np.zeros((3, 3), np.float32)},
  }
  target = {
      "pos_embed": jax.ShapeDtypeStruct((1, 4, 8), np.float32),
      "dense": {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)},
  }
  assert weights.adapt_params(loaded, target)["pos_embed"].shape == (1, 4, 8)
  target["dense"]["kernel"] = jax.ShapeDtypeStruct((3, 4), np.float32)
  with pytest.raises(ValueError, match="dense/kernel has shape"):
    weights.adapt_params(loaded, target)


def test_init_from_loads_backbone_and_keeps_fresh_head(trained_run):
  config, workdir = trained_run
  config = config.copy_and_resolve_references()
  config.init_from = workdir
  loaded, _ = weights.load_params(workdir)
  components = train_state.build(config)
  fresh = train_state.create(components, config, jax.random.PRNGKey(1))
  state = train.init_backbone_from(fresh, config)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, jax.device_get(state.params["backbone"]), loaded["backbone"]
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      jax.device_get(state.teacher_params["backbone"]),
      loaded["backbone"],
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      jax.device_get(state.params["head"]),
      jax.device_get(fresh.params["head"]),
  )
  # The loaded backbone differs from the fresh one (the test would pass vacuously otherwise).
  assert not np.array_equal(
      jax.device_get(fresh.params["backbone"]["patch_embed"]["kernel"]),
      loaded["backbone"]["patch_embed"]["kernel"],
  )


def test_config_json_of_an_older_version_gets_the_new_options():
  config = helpers.load_config("fashion_mnist", "test,dino")
  stored = json.loads(config.to_json_best_effort())
  # As written before these options existed.
  del stored["objective"]["bits"]["bce_logit_scale"], stored["objective"]["bits"]["teacher_center"]
  del stored["init_from_head"]
  loaded = run.config_from_json(json.dumps(stored))
  assert loaded.objective.bits.bce_logit_scale == 0.0 and not loaded.objective.bits.teacher_center
  assert loaded.init_from_head == "reset"
  # What the run did store wins, and the backbone's section is not completed with another
  # backbone's options (a ResNet has no patch_size).
  assert loaded.objective.name == "dino" and loaded.model.to_dict() == config.model.to_dict()
  assert loaded.input.crops.global_size == config.input.crops.global_size
  stored["model"] = {"name": "resnet18", "width": 16}
  assert "patch_size" not in run.config_from_json(json.dumps(stored)).model
