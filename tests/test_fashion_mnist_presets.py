"""configs/fashion_mnist.py: every method preset is valid and differs only where it should."""

import pytest

import helpers
from bits_jax import config_validation
from configs import common


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
@pytest.mark.parametrize("size", ["demo", "test"])
@pytest.mark.parametrize("method", common.METHODS)
def test_presets_are_valid(size, method, backbone):
  config = helpers.load_config("fashion_mnist", f"{size},{method},{backbone}")
  assert config_validation.config_problems(config) == []
  assert config.model.name == backbone


def test_resnet_preset_changes_only_the_backbone_and_its_schedule():
  vit = helpers.load_config("fashion_mnist", "").to_dict()
  resnet = helpers.load_config("fashion_mnist", "resnet18").to_dict()
  assert resnet["model"] == dict(name="resnet18", width=32, small_stem=False)
  # Fewer steps at the ViT's training wall time, with the same number of head segments.
  assert resnet["total_steps"] < vit["total_steps"]
  segments = lambda c: round(c["total_steps"] / c["objective"]["head"]["reset_every_steps"])
  assert segments(resnet) == segments(vit) == 3
  for config in (vit, resnet):
    del config["model"], config["total_steps"], config["objective"]["head"]["reset_every_steps"]
    del config["optim"]["warmup_steps"], config["objective"]["dino"]["warmup_teacher_temp_steps"]
    del config["objective"]["dino"]["freeze_last_layer_steps"]
  assert resnet == vit


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
