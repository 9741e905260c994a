"""bits_jax.load_backbone: workdir, step directory and converted weights; a cheap import."""

import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest

import bits_jax
from bits_jax import checkpoint as checkpoint_lib
from bits_jax import models
from bits_jax import train
from bits_jax import weights as weights_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run's workdir (config.json + checkpoint step 1) with distinct student and teacher."""
  config = helpers.load_config("fashion_mnist", "test")
  workdir = tmp_path_factory.mktemp("run")
  _, state = helpers.create_state(config)
  teacher = jax.tree_util.tree_map(lambda x: x + 0.01, state.teacher_params)
  state = state.replace(step=state.step + 1, teacher_params=teacher)
  train._store_config(config, workdir)  # pylint: disable=protected-access
  checkpoints = checkpoint_lib.Checkpoints(workdir, config)
  checkpoints.save(1, state)
  checkpoints.close()
  return workdir, config, state


def _images(config, n=3):
  size, channels = config.input.crops.global_size, config.input.num_channels
  return np.random.RandomState(0).randn(n, size, size, channels).astype(np.float32)


def _expected(config, backbone_params, images):
  out = models.build_backbone(config).apply({"params": backbone_params}, images, train=False)
  return np.asarray(out["cls"], np.float32)


def test_workdir_and_step_dir_give_the_teacher(workdir):
  path, config, state = workdir
  apply_fn, params, loaded_config = bits_jax.load_backbone(path)
  assert loaded_config.objective.bits.num_bits == config.objective.bits.num_bits
  assert "head" in params
  images = _images(config)
  features = np.asarray(apply_fn(params, images))
  assert features.shape == (3, models.feature_dim(config)) and features.dtype == np.float32
  teacher = jax.device_get(state.teacher_params["backbone"])
  np.testing.assert_allclose(features, _expected(config, teacher, images), rtol=1e-4, atol=1e-4)

  apply_fn, params, _ = bits_jax.load_backbone(path / "checkpoints" / "1", which="student")
  student = jax.device_get(state.params["backbone"])
  np.testing.assert_allclose(
      np.asarray(apply_fn(params, images)), _expected(config, student, images), rtol=1e-4, atol=1e-4
  )


def test_converted_weights_use_their_meta_or_the_given_config(workdir, tmp_path):
  _, config, state = workdir
  backbone = jax.device_get(state.teacher_params["backbone"])
  meta = {"model": "vit", "patch_size": config.model.patch_size, "num_channels": 1}
  converted = weights_lib.save_params(tmp_path / "converted", {"backbone": backbone}, meta)
  with pytest.raises(ValueError, match="config.model"):  # a plain 'vit' needs its width
    bits_jax.load_backbone(converted)
  apply_fn, params, _ = bits_jax.load_backbone(converted, config=config)
  assert "head" not in params
  images = _images(config, 2)
  np.testing.assert_allclose(
      np.asarray(apply_fn(params, images)),
      _expected(config, backbone, images),
      rtol=1e-4,
      atol=1e-4,
  )


def test_missing_config_is_explained(tmp_path):
  weights_lib.save_params(tmp_path / "bare", {"backbone": {"w": np.zeros(2, np.float32)}})
  with pytest.raises(ValueError, match="pass config="):
    bits_jax.load_backbone(tmp_path / "bare")


def test_import_bits_jax_stays_cheap():
  code = (
      "import sys, bits_jax; "
      "print(sorted(m for m in ('jax', 'tensorflow', 'orbax', 'flax') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
  assert "load_backbone" in dir(bits_jax) and "load_backbone" in bits_jax.__all__


def _converted(tmp_path, arch, model, image_shape):
  """(params directory written by the converter from `model`'s random init, variables)."""
  from bits_jax.tools import convert  # pylint: disable=g-import-not-at-top

  variables = jax.jit(model.init)(jax.random.PRNGKey(3), np.zeros(image_shape, np.float32))
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  params = {"backbone": variables["params"]}
  if variables.get("batch_stats"):
    params["batch_stats"] = {"backbone": variables["batch_stats"]}
  source = weights_lib.save_params(tmp_path / "trained", params)
  out = tmp_path / "converted"
  convert.convert("flax", str(source), str(out), arch)
  return out, variables


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_converted_weights_alone_build_their_model(tmp_path, arch):
  """Only convert_meta.json describes the model: no config.json, no config argument."""
  from bits_jax.models import resnet  # pylint: disable=g-import-not-at-top
  from bits_jax.models import vit  # pylint: disable=g-import-not-at-top

  if arch == "resnet18":
    model = resnet.ResNet(block="basic", stage_sizes=(2, 2, 2, 2), width=4, small_stem=True)
    shape = (1, 16, 16, 1)
  else:
    model = vit.ViT(width=192, depth=12, num_heads=3, patch_size=16, image_size=32)
    shape = (1, 32, 32, 3)
  converted, variables = _converted(tmp_path, arch, model, shape)
  apply_fn, params, config = bits_jax.load_backbone(converted)
  assert config.model.name == arch and "head" not in params
  if arch == "resnet18":
    assert dict(config.model) == {"name": "resnet18", "width": 4, "small_stem": True}
  else:
    assert config.model.patch_size == 16 and config.input.crops.global_size == 32
  assert config.input.num_channels == shape[-1]
  images = np.random.RandomState(1).randn(2, *shape[1:]).astype(np.float32)
  expected = np.asarray(model.apply(variables, images, train=False)["cls"], np.float32)
  np.testing.assert_allclose(np.asarray(apply_fn(params, images)), expected, rtol=1e-4, atol=1e-4)
