"""configs/transfer.py: continued SSL presets load and validate for every target (no training)."""

import re

import numpy as np
import pytest
from PIL import Image

import helpers
from bits_jax import config_defaults
from bits_jax import config_validation
from bits_jax import weights


def _problems(config):
  problems = config_validation.config_problems(config)
  if "init_from_head" not in config_defaults.base_config():
    # Until config_defaults documents the key this preset sets (read with a default).
    problems = [p for p in problems if "config.init_from_head" not in p]
  return problems


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """<root>/{train,test}/<class>/*.png: 2 classes, 600 train and 4 test images."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.RandomState(0)
  for split, n in (("train", 300), ("test", 2)):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      for i in range(n):
        pixels = rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
  return str(root)


@pytest.mark.parametrize(
    "dataset, train, num_train, test",
    [
        ("food101", "train", 75_750, "validation"),
        ("caltech_birds2011", "train", 5_994, "test"),
        ("i_naturalist2021", "mini", 500_000, "val"),
        ("imagefolder", "train", 600, "test"),
    ],
)
@pytest.mark.parametrize("variant, head", [("fixed", "keep"), ("reset", "reset")])
def test_transfer_preset(dataset, train, num_train, test, variant, head, image_folder):
  if dataset == "imagefolder":
    dataset = f"imagefolder:{image_folder}"
  config = helpers.load_config("transfer", f"{variant},dataset={dataset}")
  assert config.input.dataset == dataset and config.input.train_split == train
  assert config.init_from_head == head
  head_cfg = config.objective.head
  assert (config.objective.name, head_cfg.reset_every_steps, head_cfg.reset_every_epochs) == (
      "bits",
      0,
      0,
  )
  per_epoch = max(num_train // 256, 1)
  assert config.total_steps == 10 * per_epoch and config.optim.warmup_steps == per_epoch
  assert config.model.name == "vit_base" and config.model.drop_path_rate == 0.1
  evals = config.evals
  assert {n for n, e in evals.items() if e.at_end} == {"knn", "linear", "retrieval"}
  assert (evals.knn.bank_split, evals.knn.query_split) == (train, test)
  assert (evals.linear.train_split, evals.linear.test_split) == (train, test)
  assert (evals.retrieval.database_split, evals.retrieval.query_split) == (train, test)
  # Without --config.init_from the config is refused before anything is built, naming the
  # override (and the weight loading says so too).
  (problem,) = _problems(config)
  assert re.match("config.init_from is not set.*--config.init_from=", problem), problem
  with pytest.raises(ValueError, match="config.init_from is not set.*--config.init_from="):
    weights.load_params(config.init_from)
  config.init_from = "/runs/vitb16_reset"
  assert _problems(config) == []
  # The inputs are normalised as in the pre-training (ImageNet), not 0.5 / 0.5.
  from bits_jax.data import augment  # pylint: disable=g-import-not-at-top

  spec = augment.color_spec(config.input)
  assert (spec.mean, spec.std) == augment.KNOWN_NORMALIZATION["imagenet2012"]


def test_transfer_init_from_option_and_bad_dataset():
  config = helpers.load_config("transfer", "fixed,dataset=food101,init_from=/runs/b16,vit_small")
  assert (config.init_from, config.model.name) == ("/runs/b16", "vit_small")
  with pytest.raises(ValueError, match="dataset='cifar10'.*imagefolder:/path"):
    helpers.load_config("transfer", "dataset=cifar10")
