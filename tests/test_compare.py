"""bits_jax.compare: per-method configs from one file, overrides, the Markdown table."""
import os

import pytest

from bits_jax import compare
from tests import helpers

_CONFIG = os.path.join(helpers.REPO, "configs", "fashion_mnist.py")


@pytest.mark.parametrize("method", ["bits", "dino", "simdino"])
def test_same_budget_one_key_apart(method):
  base = compare.load_config(f"{_CONFIG}:test", "bits")
  config = compare.load_config(f"{_CONFIG}:test", method, ["total_steps=3", "learning_rate=5e-4"])
  assert config.method == method and config.total_steps == 3
  assert config.learning_rate == 5e-4
  for key in ("model", "vit_width", "batch_size", "warmup_steps", "dataset", "num_local_crops",
              "teacher_momentum", "knn_ks"):
    assert config[key] == base[key], key


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown method 'byol'"):
    compare.load_config(_CONFIG, "byol")
  with pytest.raises(ValueError, match="KEY=VALUE with a key of the config"):
    compare.load_config(_CONFIG, "dino", ["no_such_key=1"])
  with pytest.raises(FileNotFoundError, match="not found"):
    compare.load_config("configs/nope.py", "dino")


def test_markdown_table():
  rows = [{"method": "bits", "knn_top1": 0.8123, "knn_top1_random_init": 0.7, "knn_k": 20,
           "step": 800, "steps_per_second": 1.234, "wall_seconds": 600.0},
          {"method": "dino", "knn_top1": 0.75, "knn_top1_random_init": 0.7, "knn_k": 20,
           "step": 800, "wall_seconds": 610.4}]
  table = compare.markdown_table(rows).splitlines()
  assert table[0].startswith("| method | k-NN top-1 (k=20) |")
  assert table[2] == "| bits | 81.23% | 70.00% | 800 | 1.23 | 600 |"
  assert table[3] == "| dino | 75.00% | 70.00% | 800 | n/a | 610 |"
