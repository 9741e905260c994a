"""`python -m bits_jax.evaluate --evals=davis,maskcut` on tiny synthetic data directories.

The entries are what config.evals.davis / .maskcut hold (data paths None), filled in from the
command line as a user does (`--config.evals.davis.data_dir=...`).
"""

import inspect
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from bits_jax import config_validation
from bits_jax import train_state
from bits_jax import utils
from bits_jax import weights as weights_lib
from bits_jax.evaluate import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = """
import ml_collections
from ml_collections.config_dict import placeholder
from configs import fashion_mnist


def get_config(arg=None):
  del arg
  config = fashion_mnist.get_config("test")
  config.input.num_channels = 3
  config.model.patch_size = 8
  config.input.crops.update(dict(global_size=32, local_size=16))
  # The entries the lead adds to config_defaults (placeholders: None, overridable by type).
  config.evals.davis = ml_collections.ConfigDict(dict(
      type="davis", every=0, at_end=False, data_dir=placeholder(str),
      tfds_name=placeholder(str), tfds_data_dir=placeholder(str),
      max_sequences=placeholder(int), save_examples=2))
  config.evals.maskcut = ml_collections.ConfigDict(dict(
      type="maskcut", every=0, at_end=False, images_dir=placeholder(str),
      annotations=placeholder(str), tfds_name=placeholder(str),
      tfds_data_dir=placeholder(str), max_images=placeholder(int), save_examples=4))
  config.evals.maskcut.image_size = 32  # this test's tiny images
  return config
"""


def _write_davis(root):
  """One sequence 'sq': a red square moving right over 5 frames of 32 x 64."""
  for sub in ("JPEGImages/480p/sq", "Annotations/480p/sq", "ImageSets/2017"):
    os.makedirs(os.path.join(root, sub))
  for t in range(5):
    mask = np.zeros((32, 64), np.uint8)
    mask[8:24, 4 + 6 * t : 20 + 6 * t] = 1
    frame = np.where(mask[..., None] > 0, [200, 30, 30], [30, 160, 30]).astype(np.uint8)
    Image.fromarray(frame).save(os.path.join(root, "JPEGImages/480p/sq", f"{t:05d}.jpg"))
    ann = Image.fromarray(mask, mode="L").convert("P")
    ann.putpalette([0, 0, 0, 128, 0, 0] + [0] * (3 * 254))
    ann.save(os.path.join(root, "Annotations/480p/sq", f"{t:05d}.png"))
  with open(os.path.join(root, "ImageSets/2017/val.txt"), "w") as f:
    f.write("sq\n")


def _write_coco(root):
  """One 32 x 48 image with one object; its instances json."""
  os.makedirs(os.path.join(root, "val2017"))
  image = np.zeros((32, 48, 3), np.uint8) + np.uint8([30, 160, 30])
  image[8:24, 16:40] = [30, 30, 200]
  Image.fromarray(image).save(os.path.join(root, "val2017", "1.jpg"))
  box = [16, 8, 24, 16]
  data = {
      "images": [{"id": 1, "file_name": "1.jpg", "height": 32, "width": 48}],
      "annotations": [{
          "id": 1,
          "image_id": 1,
          "category_id": 1,
          "bbox": box,
          "area": 384,
          "iscrowd": 0,
          "segmentation": [[16, 8, 40, 8, 40, 24, 16, 24]],
      }],
      "categories": [{"id": 1, "name": "thing"}],
  }
  path = os.path.join(root, "instances_val2017.json")
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def _config(tmp_path):
  """(config file, its config) of _CONFIG."""
  config_file = tmp_path / "dense_config.py"
  config_file.write_text(_CONFIG)
  return config_file, utils.load_config_file(str(config_file))


def test_dense_entries_are_valid_and_disabled(tmp_path):
  _, config = _config(tmp_path)
  assert config_validation.config_problems(config) == []
  for name in ("davis", "maskcut"):
    entry = config.evals[name]
    assert entry.every == 0 and not entry.at_end
    signature = inspect.signature(common.get(entry.type))
    assert set(entry) - {"type", "every", "at_end"} <= set(signature.parameters)
  config.evals.davis.data_dir = "/data/DAVIS"  # placeholders take their type's values
  with pytest.raises(TypeError):
    config.evals.davis.max_sequences = "all"


def test_dense_evaluators_run_from_the_cli(tmp_path):
  config_file, config = _config(tmp_path)
  components = train_state.build(config)
  params, _ = train_state.init_variables(components, jax.random.PRNGKey(0))
  weights = weights_lib.save_params(tmp_path / "weights", {"backbone": params["backbone"]})
  _write_davis(str(tmp_path / "davis"))
  annotations = _write_coco(str(tmp_path / "coco"))
  out = tmp_path / "eval"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "bits_jax.evaluate",
          f"--config={config_file}",
          f"--weights={weights}",
          "--evals=davis,maskcut",
          f"--config.evals.davis.data_dir={tmp_path / 'davis'}",
          f"--config.evals.maskcut.images_dir={tmp_path / 'coco' / 'val2017'}",
          f"--config.evals.maskcut.annotations={annotations}",
          f"--out={out}",
      ],
      cwd=str(tmp_path),
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    results = json.load(f)
  for key in ("J_mean", "F_mean", "JF_mean", "seq/sq/J", "seq/sq/F", "seq/sq/JF"):
    assert 0.0 <= results[f"davis/{key}"] <= 1.0, key
  assert results["davis/num_sequences"] == 1
  for key in ("AP", "AP50", "AP75"):
    assert 0.0 <= results[f"maskcut/box/{key}"] <= 1.0
    assert 0.0 <= results[f"maskcut/mask/{key}"] <= 1.0
  assert results["maskcut/num_images"] == 1
  assert "davis/JF_mean" in (out / "results.md").read_text()
  assert sorted(os.listdir(out / "plots")) == ["davis_sq.png", "maskcut_1.png"]
