"""The ImageNet-1k presets hold the paper's recipe (PAPER.md, "Training"): config values only."""

import pytest

import helpers
from bits_jax import config_validation

STEPS_PER_EPOCH = 1_281_167 // 256  # 5004


@pytest.mark.parametrize(
    "name, model", [("imagenet_vitb16", "vit_base"), ("imagenet_vits16", "vit_small")]
)
@pytest.mark.parametrize("variant", ["reset", "fixed", "dino", "simdino"])
def test_paper_recipe(name, model, variant):
  config = helpers.load_config(name, variant)
  data, crops, optim = config.input, config.input.crops, config.optim
  assert (data.dataset, config.model.name, config.model.patch_size) == ("imagenet2012", model, 16)
  assert data.batch_size == 256
  assert config.total_steps == 100 * STEPS_PER_EPOCH
  assert optim.learning_rate == pytest.approx(5e-4 * 256 / 256)
  assert optim.warmup_steps == 10 * STEPS_PER_EPOCH
  assert (optim.weight_decay, optim.weight_decay_end, optim.teacher_momentum) == (0.04, 0.4, 0.996)
  assert config.model.drop_path_rate == 0.1
  assert (crops.num_global, crops.global_size, tuple(crops.global_scale)) == (2, 224, (0.4, 1.0))
  assert (crops.num_local, crops.local_size, tuple(crops.local_scale)) == (10, 96, (0.05, 0.4))
  head = config.objective.head
  if variant in ("reset", "fixed"):
    assert config.objective.name == "bits"
    assert (optim.end_learning_rate, optim.clip_norm) == (5e-5, 1.0)
    assert config.objective.bits.num_bits == 256
    assert config.objective.bits.coding_rate_weight == 0.1
    every = 10 * STEPS_PER_EPOCH if variant == "reset" else 0
    assert (head.reset_every_steps, head.reset_every_epochs) == (every, 0)
  else:
    assert config.objective.name == variant
    assert (optim.end_learning_rate, optim.clip_norm) == (1e-6, 3.0)
    assert (head.reset_every_steps, head.reset_every_epochs) == (0, 0)
  if variant == "dino":
    dino = config.objective.dino
    assert (dino.out_dim, dino.warmup_teacher_temp, dino.teacher_temp) == (65536, 0.04, 0.07)
    assert dino.warmup_teacher_temp_steps == 30 * STEPS_PER_EPOCH
    assert dino.freeze_last_layer_steps == STEPS_PER_EPOCH
  if variant == "simdino":
    assert config.objective.simdino.eps == 0.05
  assert config_validation.config_problems(config) == []


def test_default_and_length_presets():
  default = helpers.load_config("imagenet_vitb16")
  assert default.objective.head.reset_every_steps == 10 * STEPS_PER_EPOCH  # reset by default
  assert helpers.load_config("imagenet_vitb16", "fixed,ep300").total_steps == 300 * STEPS_PER_EPOCH
  with pytest.raises(ValueError, match="Unknown preset 'bits'"):
    helpers.load_config("imagenet_vitb16", "bits")
