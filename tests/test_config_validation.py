"""Config validation: every bad config gets its own error naming the (dotted) key and the fix."""

import dataclasses
import json
import time

import ml_collections
import pytest

from bits_jax import config_defaults
from bits_jax import config_validation
from bits_jax import objectives
from bits_jax import train
from tests import helpers


def _config(**changes):
  """The test preset with `changes` ({'optim.learning_rate': 1e-3, ...}) applied.

  Dotted keys reach into the nested sections; ConfigDict's own key and type checks are
  bypassed so that validation sees the bad value.
  """
  config = helpers.load_config("fashion_mnist", "test")
  for key, value in changes.items():
    *path, leaf = key.split(".")
    section = config
    for part in path:
      section = section[part]
    with section.unlocked(), section.ignore_type():
      section[leaf] = value
  return config


# (changes, the one message expected). The test preset runs on the 8 fake CPU devices.
_BAD_CONFIGS = {
    "typo key": (
        {"optim.learnig_rate": 1e-3},
        "unknown key config.optim.learnig_rate: did you mean 'optim.learning_rate'?",
    ),
    "unknown key": ({"frobnicate": 1}, "unknown key config.frobnicate: remove it, or add it"),
    "wrong type str": (
        {"total_steps": "100"},
        "config.total_steps='100' is a str; it must be an int",
    ),
    "wrong type float for int": (
        {"objective.bits.num_bits": 32.0},
        "config.objective.bits.num_bits=32.0 is a float; it must be an int",
    ),
    "wrong type bool": (
        {"evals.knn.at_end": "yes"},
        "config.evals.knn.at_end='yes' is a str; it must be a bool",
    ),
    "wrong type bool top level": (
        {"baseline_random_init": "yes"},
        "config.baseline_random_init='yes' is a str; it must be a bool",
    ),
    "bits zero": (
        {"objective.bits.num_bits": 0},
        "config.objective.bits.num_bits=0 must be > 0 (the number of bits",
    ),
    "bits negative": (
        {"objective.bits.num_bits": -8},
        "config.objective.bits.num_bits=-8 must be > 0",
    ),
    "bits None": (
        {"objective.bits.num_bits": None},
        "config.objective.bits.num_bits=None must be > 0",
    ),
    "global crop below patch": (
        {"input.crops.global_size": 4},
        (
            "config.input.crops.global_size=4 is smaller than config.model.patch_size=7: a ViT "
            "needs at least"
        ),
    ),
    "local crop below patch": (
        {"input.crops.local_size": 5},
        "config.input.crops.local_size=5 is smaller than config.model.patch_size=7",
    ),
    "crop not a multiple of patch": (
        {"input.crops.global_size": 30},
        (
            "config.input.crops.global_size=30 is not a multiple of config.model.patch_size=7: use "
            "28 or 35"
        ),
    ),
    "batch not divisible by devices": (
        {"input.batch_size": 12},
        "config.input.batch_size=12 is not divisible by the 8 devices of the mesh",
    ),
    "eval batch not divisible by devices": (
        {"input.eval_batch_size": 100},
        "config.input.eval_batch_size=100 is not divisible by the 8 devices",
    ),
    "mesh larger than devices": (
        {"mesh": {"data": 3, "fsdp": 1}},
        "needs 3 devices but 8 are used",
    ),
    "warmup longer than run": (
        {"optim.warmup_steps": 10},
        "config.optim.warmup_steps=10 is longer than config.total_steps=6: the learning rate would",
    ),
    "head re-init never happens": (
        {"objective.head.reset_every_steps": 6},
        (
            "config.objective.head.reset_every_steps=6 is not below config.total_steps=6: the head "
            "would never"
        ),
    ),
    "head resets set twice": (
        {"objective.head.reset_every_steps": 2, "objective.head.reset_every_epochs": 1},
        "config.objective.head.reset_every_steps=2 and reset_every_epochs=1 are both set",
    ),
    "negative head reset": (
        {"objective.head.reset_every_epochs": -1},
        "config.objective.head.reset_every_epochs=-1 must be >= 0 (0 = never)",
    ),
    "negative bottleneck": (
        {"objective.head.bottleneck_dim": -1},
        "config.objective.head.bottleneck_dim=-1 must be >= 0 (0 = the paper's head",
    ),
    "unknown agreement": (
        {"objective.bits.agreement": "l1"},
        "config.objective.bits.agreement='l1': use one of ('bce', 'cosine')",
    ),
    "unknown rate convention": (
        {"objective.bits.rate_eps_convention": "dino"},
        "config.objective.bits.rate_eps_convention='dino': use one of ('simdino', 'paper')",
    ),
    "unknown clip mode": (
        {"optim.clip_mode": "layer"},
        "config.optim.clip_mode='layer': use 'per_tensor' (each gradient tensor clipped on its own",
    ),
    "min lr above peak": (
        {"optim.end_learning_rate": 1.0},
        "config.optim.end_learning_rate=1.0 is above config.optim.learning_rate",
    ),
    "zero steps": (
        {"total_steps": 0, "optim.warmup_steps": 0},
        "config.total_steps=0 must be positive",
    ),
    "negative warmup": ({"optim.warmup_steps": -1}, "config.optim.warmup_steps=-1 must be >= 0"),
    "momentum above one": (
        {"optim.teacher_momentum": 1.5},
        "config.optim.teacher_momentum=1.5 must be in [0.0, 1.0]",
    ),
    "coding rate eps zero": (
        {"objective.bits.eps": 0.0},
        "config.objective.bits.eps=0.0 must be > 0 (the distortion",
    ),
    "crop scale reversed": (
        {"input.crops.global_scale": (0.9, 0.2)},
        "config.input.crops.global_scale=(0.9, 0.2) must be (low, high)",
    ),
    "local crop scale not numbers": (
        {"input.crops.local_scale": ("small", 0.4)},
        "config.input.crops.local_scale=('small', 0.4) must be (low, high)",
    ),
    "global view scales, one pair for two views": (
        {"input.crops.global_view_scales": ((0.4, 1.0),)},
        "config.input.crops.global_view_scales has 1 (low, high) pairs for num_global=2",
    ),
    "single view": (
        {
            "input.crops.num_global": 1,
            "input.crops.num_local": 0,
            "input.crops.global_view_scales": (),
        },
        "self-distillation needs at least two views",
    ),
    "unknown method": (
        {"objective.name": "byol"},
        "Unknown method 'byol': set config.objective.name to one of",
    ),
    "unknown model": ({"model.name": "vit_huge"}, "Unknown config.model.name='vit_huge'"),
    "unknown model option": ({"model.widht": 32}, "config.model.widht is not an option of 'vit'"),
    "unknown TFDS dataset": (
        {"input.dataset": "fashon_mnist"},
        (
            "unknown dataset 'fashon_mnist' (did you mean 'fashion_mnist'?): set "
            "config.input.dataset to"
        ),
    ),
    "malformed dataset": ({"input.dataset": "foo:bar"}, "unknown dataset 'foo:bar'"),
    "missing npz": (
        {"input.dataset": "npz:/nonexistent/x.npz"},
        "file /nonexistent/x.npz does not exist",
    ),
    "missing image folder": (
        {"input.dataset": "imagefolder:/nonexistent/dir"},
        "directory /nonexistent/dir does not exist",
    ),
    "non-finite policy": ({"on_nonfinite": "ignore"}, "config.on_nonfinite='ignore': use 'skip'"),
    "init_from head policy": (
        {"init_from_head": "fresh"},
        "config.init_from_head='fresh': use 'reset'",
    ),
    "zero consecutive": (
        {"max_consecutive_nonfinite": 0},
        "config.max_consecutive_nonfinite=0 must be positive",
    ),
    "dtype": ({"dtype": "float16"}, "config.dtype='float16': use 'float32' or 'bfloat16'"),
    "grad accumulation": (
        {"optim.grad_accum_steps": 3},
        "config.input.batch_size=16 is not divisible by grad_accum_steps=3",
    ),
    "unknown evaluator type": (
        {"evals.knn.type": "knm"},
        "config.evals.knn.type: Unknown evaluator type 'knm'",
    ),
    "unknown evaluator section type": (
        {"evals.probe": {"type": "lineer", "at_end": True}},
        "config.evals.probe.type: Unknown evaluator type 'lineer'",
    ),
    "evaluator entry without type": (
        {"evals.probe": {"at_end": True}},
        "config.evals.probe must be a dict with a 'type'",
    ),
    "unknown evaluator kwarg": (
        {"evals.knn.kz": (5,)},
        "config.evals.knn.kz is not an option of the 'knn' evaluator: use ['bank_split'",
    ),
    "evaluator every negative": (
        {"evals.knn.every": -1},
        "config.evals.knn.every=-1 must be an int >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_bad_config_gives_its_own_error(case):
  changes, message = _BAD_CONFIGS[case]
  problems = config_validation.config_problems(_config(**changes))
  assert len(problems) == 1, problems
  assert message in problems[0], problems[0]
  with pytest.raises(config_validation.ConfigError, match="Invalid config \\(1 problem\\)"):
    config_validation.validate_config(_config(**changes))


@pytest.mark.parametrize("preset", ["test", "demo", "test,dino", "test,simdino"])
def test_good_presets_pass(preset):
  assert config_validation.config_problems(helpers.load_config("fashion_mnist", preset)) == []


@pytest.mark.parametrize(
    "changes,parts",
    [
        (
            {
                "objective.bits.num_bits": 0,
                "optim.teacher_momentum": 1.5,
                "optim.learnig_rate": 1.0,
            },
            (
                "config.objective.bits.num_bits=0",
                "config.optim.teacher_momentum=1.5",
                "config.optim.learnig_rate",
            ),
        ),
        # An unknown method has no section to check: the other problems are still listed.
        (
            {"objective.name": "byol", "model.name": "vit_huge", "optim.learnig_rate": 1.0},
            ("'byol'", "'vit_huge'", "config.optim.learnig_rate"),
        ),
    ],
)
def test_every_problem_is_listed_at_once(changes, parts):
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(_config(**changes))
  text = str(error.value)
  assert text.startswith("Invalid config (3 problems):"), text
  for part in parts:
    assert part in text


def test_keys_methods_and_models_come_from_the_registries(monkeypatch):
  """Every base_config key is accepted (e.g. the DINO ones); an objective's own
  `config_problems` hook is consulted."""
  assert config_validation.config_problems(_config(**{"objective.name": "dino"})) == []
  registered = objectives.get

  def get(name):
    return dataclasses.replace(
        registered(name),
        config_problems=lambda config: [
            f"config.objective.bits.num_bits={config.objective.bits.num_bits}: odd"
        ],
    )

  monkeypatch.setattr(objectives, "get", get)
  assert config_validation.config_problems(_config(**{"objective.bits.num_bits": 31})) == [
      "config.objective.bits.num_bits=31: odd"
  ]


def test_model_options_come_from_the_backbone():
  """Any field of the backbone is a valid config.model key; other backbones' are not."""
  assert config_validation.config_problems(_config(**{"model.remat": True})) == []
  problems = config_validation.config_problems(_config(**{"model.small_stem": True}))
  assert len(problems) == 1 and "config.model.small_stem is not an option of 'vit'" in (
      problems[0]
  ), problems
  # Another backbone's option: the hint says how to switch backbones.
  assert "configs/fashion_mnist.py:resnet18" in problems[0]
  problems = config_validation.config_problems(_config(**{"model.widht": 32}))
  assert "another backbone" not in problems[0]  # a typo gets no such hint


def test_train_rejects_a_bad_config_before_building_anything(tmp_path):
  start = time.time()
  with pytest.raises(config_validation.ConfigError, match="config.objective.bits.num_bits=0"):
    train.train(_config(**{"objective.bits.num_bits": 0}), str(tmp_path / "run"))
  assert time.time() - start < 60
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ resume


def _stored(config):
  return json.loads(config.to_json_best_effort())


def test_resume_refuses_a_changed_key_and_names_the_fix():
  stored = _stored(_config())
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.check_resume_config(
        stored, _config(**{"total_steps": 12, "objective.bits.num_bits": 64})
    )
  text = str(error.value)
  assert "  - objective.bits.num_bits: 32 in the workdir, 64 now" in text
  assert "  - total_steps: 6 in the workdir, 12 now" in text
  assert "--config.allow_config_change=objective.bits.num_bits,total_steps" in text


@pytest.mark.parametrize(
    "changes,allow",
    [
        (
            {
                "log_every": 1,
                "checkpoint_every": 1,
                "keep_checkpoints": 9,
                "evals.knn.at_end": False,
                "evals.knn.ks": (5,),
                "input.eval_batch_size": 128,
                "on_nonfinite": "stop",
                "mesh.data": 4,
                "mesh.fsdp": 2,
                "model.remat": True,
            },
            "",
        ),
        ({"total_steps": 12}, "total_steps"),
        ({"total_steps": 12, "optim.learning_rate": 1.0}, "optim.learning_rate, total_steps"),
        ({"total_steps": 12, "objective.bits.num_bits": 64}, "objective.bits.num_bits,total_steps"),
        ({"total_steps": 12, "objective.bits.num_bits": 64}, "*"),
    ],
)
def test_resume_accepts_safe_and_allowed_changes(changes, allow):
  differences = config_validation.check_resume_config(
      _stored(_config()), _config(allow_config_change=allow, **changes)
  )
  assert set(changes) <= set(differences), differences


def test_resume_allows_only_the_listed_key():
  with pytest.raises(config_validation.ConfigError, match="objective.bits.num_bits: 32"):
    config_validation.check_resume_config(
        _stored(_config()),
        _config(**{
            "total_steps": 12,
            "objective.bits.num_bits": 64,
            "allow_config_change": "total_steps",
        }),
    )


def test_resume_with_the_same_config_has_no_differences():
  assert config_validation.check_resume_config(_stored(_config()), _config()) == {}


def test_resume_of_a_run_written_before_an_option_existed():
  stored = _stored(_config())
  bits = stored["objective"]["bits"]
  assert not bits["teacher_center"]  # at its default in the preset
  del bits["teacher_center"], bits["teacher_center_momentum"]
  # At their defaults the new options change nothing the run did: no difference.
  assert config_validation.check_resume_config(stored, _config()) == {}
  # Set to something else, they are changes like any other.
  with pytest.raises(config_validation.ConfigError, match="teacher_center: '<absent>'"):
    config_validation.check_resume_config(
        stored, _config(**{"objective.bits.teacher_center": True})
    )


def test_resume_does_not_complete_the_backbone_section():
  # base_config()'s model is a ViT example; a ResNet run stored no patch_size, and a
  # patch_size added now is a change, not the default coming back.
  stored = _stored(_config())
  stored["model"] = {"name": "resnet18", "width": 16}
  now = _config()
  now.model = {"name": "resnet18", "width": 16, "patch_size": 16}
  assert "model.patch_size" in config_validation.config_differences(stored, now)
  now.model = {"name": "resnet18", "width": 16}
  assert config_validation.config_differences(stored, now) == {}


def test_complete_skips_only_the_top_level_choice_sections():
  defaults = ml_collections.ConfigDict(
      {"model": {"patch_size": 16}, "optim": {"lr": 1.0, "model": {"ema": 0.9}}, "seed": 0}
  )
  stored = ml_collections.ConfigDict({"model": {"width": 8}, "optim": {"model": {}}})
  config_defaults.complete(stored, defaults)
  assert "patch_size" not in stored.model  # a backbone choice: left as stored
  assert stored.optim.lr == 1.0 and stored.seed == 0  # options added since: their defaults
  assert stored.optim.model.ema == 0.9  # a nested key named 'model' is an ordinary section


def test_a_stored_config_without_a_behaviour_changing_option_keeps_the_old_behaviour():
  """Options whose default changed what the code does complete to the old behaviour, so a
  run written before them resumes as it was trained (or is refused, never silently changed)."""
  stored = config_defaults.base_config().to_dict()
  del stored["optim"]["clip_mode"], stored["optim"]["decay_embeddings"]
  del stored["objective"]["simdino"]["rate_views"]
  completed = config_defaults.complete(ml_collections.ConfigDict(stored))
  assert completed.optim.clip_mode == "global" and completed.optim.decay_embeddings is False
  assert completed.objective.simdino.rate_views == "student"
  assert completed.objective.simdino.rate_scope == "device"  # stored: kept
  # Resuming it with today's defaults is a refused difference, not a silent change.
  differences = config_validation.config_differences(stored, config_defaults.base_config())
  assert differences["optim.clip_mode"] == ("<absent>", "per_tensor")
  assert differences["objective.simdino.rate_views"] == ("<absent>", "student_teacher")
  assert "objective.simdino.rate_scope" not in differences
