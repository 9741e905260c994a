"""configs/fashion_mnist.py: every method preset is valid and differs only where it should."""

import pytest

import helpers
from bits_jax import config_validation
from configs import common


@pytest.mark.parametrize("size", ["demo", "test"])
@pytest.mark.parametrize("method", common.METHODS)
def test_presets_are_valid(size, method):
  config = helpers.load_config("fashion_mnist", f"{size},{method}")
  assert config_validation.config_problems(config) == []


def test_methods_share_backbone_data_and_budget_and_set_their_objective():
  configs = {m: helpers.load_config("fashion_mnist", f"method={m}") for m in common.METHODS}
  base = configs["bits"]
  for config in configs.values():
    assert config.model.to_dict() == base.model.to_dict()
    assert config.input.to_dict() == base.input.to_dict()
    assert config.optim.to_dict() == base.optim.to_dict()
    assert config.total_steps == base.total_steps
  assert base.objective.name == "bits" and base.objective.head.reset_every_steps > 0
  assert configs["bits_cosine"].objective.bits.agreement == "cosine"
  assert configs["bits_cosine"].objective.head.reset_every_steps > 0
  fixed = configs["bits_fixed"]
  assert fixed.objective.name == "bits" and fixed.objective.bits.agreement == "bce"
  for method in ("bits_fixed", "dino", "simdino"):
    head = configs[method].objective.head
    assert head.reset_every_steps == 0 and head.reset_every_epochs == 0, method
  assert configs["dino"].objective.name == "dino"
  assert configs["simdino"].objective.name == "simdino"


def test_unknown_method_is_an_error():
  with pytest.raises(ValueError, match="bits_fixed"):
    helpers.load_config("fashion_mnist", "method=byol")
  with pytest.raises(ValueError, match="Unknown method"):
    common.set_method(helpers.load_config("fashion_mnist", "test"), "byol")
