"""The evaluation CLI path on a real (tiny) checkpoint, weight adaptation, init_from."""
import json
import os

import jax
import numpy as np
import pytest

from bits_jax import train
from bits_jax import train_state
from bits_jax.evaluate import pretrained
from bits_jax.evaluate import run
from tests import helpers


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  config = helpers.load_config("fashion_mnist", "test")
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train(config, workdir, stop_at_step=3)
  return config, workdir


def test_evaluate_writes_every_result(trained_run, tmp_path):
  config, workdir = trained_run
  config = config.copy_and_resolve_references()
  config.eval_linear_epochs = 3
  config.eval_knn_ks = (10, 20)
  config.eval_dense_images = 16
  out = str(tmp_path / "eval")
  results = run.evaluate(config, weights=workdir, out_dir=out)
  assert results["step"] == 3
  for key in ("knn_top1_k10", "knn_top1_k20", "linear_top1", "retrieval/hamming/map@all",
              "retrieval/cosine/map@all", "codes/bit_entropy_mean", "dense/seg_miou"):
    assert 0.0 <= results[key] <= config.bits, key
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["knn_top1_k20"] == results["knn_top1_k20"]
  assert "| knn_top1_k20 |" in open(os.path.join(out, "results.md")).read()
  assert sorted(os.listdir(os.path.join(out, "plots"))) == [
      "bit_balance.png", "bit_correlation.png", "class_bit_activation.png",
      "retrieval_precision.png"]


def test_load_params_from_workdir_step_dir_and_params_dir(trained_run, tmp_path):
  _, workdir = trained_run
  from_workdir, step = pretrained.load_params(workdir)
  from_step, step2 = pretrained.load_params(os.path.join(workdir, "checkpoints", "3"))
  assert step == step2 == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_workdir, from_step)
  import orbax.checkpoint as ocp
  params_dir = str(tmp_path / "params")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, {"backbone": from_workdir["backbone"]})
  only_backbone, step3 = pretrained.load_params(params_dir)
  assert step3 is None and set(only_backbone) == {"backbone"}
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_params(str(tmp_path / "nope"))


def test_rgb_to_gray_patch_embedding_is_exact():
  rng = np.random.RandomState(0)
  rgb_kernel = rng.randn(4, 4, 3, 8).astype(np.float32)
  target = jax.ShapeDtypeStruct((4, 4, 1, 8), np.float32)
  gray_kernel = pretrained.adapt_params({"patch_embed": {"kernel": rgb_kernel}},
                                        {"patch_embed": {"kernel": target}})
  gray_kernel = gray_kernel["patch_embed"]["kernel"]
  patch = rng.rand(4, 4, 1).astype(np.float32)
  np.testing.assert_allclose(np.einsum("hwc,hwco->o", np.repeat(patch, 3, -1), rgb_kernel),
                             np.einsum("hwc,hwco->o", patch, gray_kernel), rtol=1e-5)


def test_pos_embed_resized_and_mismatch_named():
  loaded = {"pos_embed": np.random.randn(1, 16, 8).astype(np.float32),
            "dense": {"kernel": np.zeros((3, 3), np.float32)}}
  target = {"pos_embed": jax.ShapeDtypeStruct((1, 4, 8), np.float32),
            "dense": {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)}}
  assert pretrained.adapt_params(loaded, target)["pos_embed"].shape == (1, 4, 8)
  target["dense"]["kernel"] = jax.ShapeDtypeStruct((3, 4), np.float32)
  with pytest.raises(ValueError, match="dense/kernel has shape"):
    pretrained.adapt_params(loaded, target)


def test_init_from_loads_backbone_and_keeps_fresh_head(trained_run):
  config, workdir = trained_run
  config = config.copy_and_resolve_references()
  config.init_from = workdir
  loaded, _ = pretrained.load_params(workdir)
  fresh = train_state.create_train_state(config, jax.random.PRNGKey(1))
  state = train.init_backbone_from(fresh, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(
      state.params["backbone"]), loaded["backbone"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(
      state.teacher_params["backbone"]), loaded["backbone"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(
      state.params["head"]), jax.device_get(fresh.params["head"]))
