"""A checkpoint written on one mesh restores onto another (other device count, FSDP instead
of pure data parallel) and the run continues as if uninterrupted."""

import shutil

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from bits_jax import train
from tests import helpers


def _config(mesh):
  config = helpers.load_config("fashion_mnist", "test")  # 6 steps, checkpoint every 3
  config.fsdp_min_size = 256
  config.mesh = mesh
  return config


def test_save_on_data8_restore_on_data2_fsdp2(tmp_path, capsys):
  full_dir = tmp_path / "full"
  full = train.train(_config({"data": 8, "fsdp": 1}), str(full_dir))
  assert len(full.params["head"]["dense0"]["kernel"].devices()) == 8

  # The uninterrupted run's step-3 checkpoint (written on data=8) starts another workdir.
  workdir = tmp_path / "resharded"
  shutil.copytree(full_dir / "checkpoints" / "3", workdir / "checkpoints" / "3")
  shutil.copy(full_dir / "config.json", workdir / "config.json")
  capsys.readouterr()
  resumed = train.train(_config({"data": 2, "fsdp": 2}), str(workdir), devices=jax.devices()[:4])
  assert "Resuming from checkpoint step 3" in capsys.readouterr().out

  kernel = resumed.params["backbone"]["block0"]["mlp"]["fc1"]["kernel"]  # [32, 128]
  assert kernel.sharding.spec == P(None, "fsdp")
  assert kernel.sharding.device_set == set(jax.devices()[:4])
  assert kernel.addressable_shards[0].data.shape == (32, 64)
  assert int(resumed.step) == int(full.step) == 6
  for name in ("params", "teacher_params"):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        jax.device_get(getattr(full, name)),
        jax.device_get(getattr(resumed, name)),
    )
