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
