"""Config validation: every bad config gets its own error naming the key and the fix."""
import json
import time

import pytest

from bits_jax import config_validation
from bits_jax import objectives
from bits_jax import train
from tests import helpers


def _config(**changes):
  """The test preset with `changes` applied, bypassing ConfigDict's own type checks."""
  config = helpers.load_config("fashion_mnist", "test")
  for key, value in changes.items():
    with config.unlocked(), config.ignore_type():
      config[key] = value
  return config


# (changes, the one message expected). The test preset runs on the 8 fake CPU devices.
_BAD_CONFIGS = {
    "typo key": (dict(learnig_rate=1e-3),
                 "unknown key config.learnig_rate: did you mean 'learning_rate'?"),
    "unknown key": (dict(frobnicate=1), "unknown key config.frobnicate: remove it, or add it"),
    "wrong type str": (dict(total_steps="100"),
                       "config.total_steps='100' is a str; it must be an int"),
    "wrong type float for int": (dict(bits=32.0), "config.bits=32.0 is a float; it must be an int"),
    "wrong type bool": (dict(knn_eval="yes"), "config.knn_eval='yes' is a str; it must be a bool"),
    "bits zero": (dict(bits=0), "config.bits=0 must be positive (the number of bits"),
    "bits negative": (dict(bits=-8), "config.bits=-8 must be positive"),
    "bits None": (dict(bits=None), "config.bits=None must be positive"),
    "global crop below patch": (
        dict(global_crop_size=4),
        "config.global_crop_size=4 is smaller than config.patch_size=7: a ViT needs at least"),
    "local crop below patch": (
        dict(local_crop_size=5), "config.local_crop_size=5 is smaller than config.patch_size=7"),
    "crop not a multiple of patch": (
        dict(global_crop_size=30),
        "config.global_crop_size=30 is not a multiple of config.patch_size=7: use 28 or 35"),
    "batch not divisible by devices": (
        dict(batch_size=12), "config.batch_size=12 is not divisible by the 8 devices of the mesh"),
    "eval batch not divisible by devices": (
        dict(eval_batch_size=100), "config.eval_batch_size=100 is not divisible by the 8 devices"),
    "mesh larger than devices": (
        dict(mesh={"data": 3, "fsdp": 1}), "needs 3 devices but 8 are used"),
    "warmup longer than run": (
        dict(warmup_steps=10),
        "config.warmup_steps=10 is longer than config.total_steps=6: the learning rate would"),
    "head re-init never happens": (
        dict(head_reinit_every=6),
        "config.head_reinit_every=6 is not below config.total_steps=6: the head would never"),
    "min lr above peak": (
        dict(min_learning_rate=1.0), "config.min_learning_rate=1.0 is above config.learning_rate"),
    "zero steps": (dict(total_steps=0, warmup_steps=0), "config.total_steps=0 must be positive"),
    "negative warmup": (dict(warmup_steps=-1), "config.warmup_steps=-1 must be >= 0"),
    "momentum above one": (dict(teacher_momentum=1.5),
                           "config.teacher_momentum=1.5 must be in [0.0, 1.0]"),
    "coding rate eps zero": (dict(coding_rate_eps=0.0), "config.coding_rate_eps=0.0 must be"),
    "crop scale reversed": (dict(global_crop_scale=(0.9, 0.2)),
                            "config.global_crop_scale=(0.9, 0.2) must be (low, high)"),
    "single view": (dict(num_global_crops=1, num_local_crops=0),
                    "self-distillation needs at least two views"),
    "unknown method": (dict(method="byol"),
                       "Unknown method 'byol': set config.method to one of"),
    "unknown model": (dict(model="vit_huge"), "Unknown config.model='vit_huge'"),
    "unknown TFDS dataset": (
        dict(dataset="fashon_mnist"),
        "unknown dataset 'fashon_mnist' (did you mean 'fashion_mnist'?): set config.dataset to"),
    "malformed dataset": (dict(dataset="foo:bar"), "unknown dataset 'foo:bar'"),
    "missing npz": (dict(dataset="npz:/nonexistent/x.npz"),
                    "file /nonexistent/x.npz does not exist"),
    "missing image folder": (dict(dataset="imagefolder:/nonexistent/dir"),
                             "directory /nonexistent/dir does not exist"),
    "non-finite policy": (dict(on_nonfinite="ignore"),
                          "config.on_nonfinite='ignore': use 'skip'"),
    "zero consecutive": (dict(max_consecutive_nonfinite=0),
                         "config.max_consecutive_nonfinite=0 must be positive"),
    "dtype": (dict(dtype="float16"), "config.dtype='float16': use 'float32' or 'bfloat16'"),
    "grad accumulation": (dict(grad_accum_steps=3), "not divisible by grad_accum_steps=3"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_bad_config_gives_its_own_error(case):
  changes, message = _BAD_CONFIGS[case]
  problems = config_validation.config_problems(_config(**changes))
  assert len(problems) == 1, problems
  assert message in problems[0], problems[0]
  with pytest.raises(config_validation.ConfigError, match="Invalid config \\(1 problem\\)"):
    config_validation.validate_config(_config(**changes))


def test_good_presets_pass():
  assert config_validation.config_problems(_config()) == []
  assert config_validation.config_problems(helpers.load_config("fashion_mnist", "demo")) == []


def test_every_problem_is_listed_at_once():
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(_config(bits=0, method="byol", learnig_rate=1.0))
  text = str(error.value)
  assert text.startswith("Invalid config (3 problems):")
  for part in ("config.bits=0", "'byol'", "config.learnig_rate"):
    assert part in text


def test_keys_methods_and_models_come_from_the_registries(monkeypatch):
  """Every base_config key is accepted (e.g. the DINO ones); an objective's own
  `config_problems` hook is consulted."""
  assert config_validation.config_problems(_config(method="dino")) == []
  module = objectives.get_objective("bits")
  monkeypatch.setattr(module, "config_problems",
                      lambda config: [f"config.bits={config.bits}: odd"], raising=False)
  assert config_validation.config_problems(_config(bits=31)) == ["config.bits=31: odd"]


def test_train_rejects_a_bad_config_before_building_anything(tmp_path):
  start = time.time()
  with pytest.raises(config_validation.ConfigError, match="config.bits=0"):
    train.train(_config(bits=0), str(tmp_path / "run"))
  assert time.time() - start < 60
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ resume


def _stored(config):
  return json.loads(config.to_json_best_effort())


def test_resume_refuses_a_changed_key_and_names_the_fix():
  stored = _stored(_config())
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.check_resume_config(stored, _config(total_steps=12, bits=64))
  text = str(error.value)
  assert "  - bits: 32 in the workdir, 64 now" in text
  assert "  - total_steps: 6 in the workdir, 12 now" in text
  assert "--config.allow_config_change=bits,total_steps" in text


@pytest.mark.parametrize("changes,allow", [
    (dict(log_every=1, checkpoint_every=1, keep_checkpoints=9, knn_eval=False,
          eval_batch_size=128, on_nonfinite="stop"), ""),
    (dict(total_steps=12), "total_steps"),
    (dict(total_steps=12, learning_rate=1.0), "learning_rate, total_steps"),
    (dict(total_steps=12, bits=64), "*"),
])
def test_resume_accepts_safe_and_allowed_changes(changes, allow):
  differences = config_validation.check_resume_config(
      _stored(_config()), _config(allow_config_change=allow, **changes))
  assert set(changes) <= set(differences)


def test_resume_with_the_same_config_has_no_differences():
  assert config_validation.check_resume_config(_stored(_config()), _config()) == {}
