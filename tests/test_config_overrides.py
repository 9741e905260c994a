"""Every key of every config file can be set from the command line, unset ones (None) too,
and every documented `python -m bits_jax.main` command parses its --config flags."""

import functools
import glob
import os
import re
from unittest import mock

from absl import app
from absl import flags
from ml_collections import config_dict
import pytest

import helpers
from bits_jax import config_validation
from bits_jax import utils

_CONFIG_FILES = sorted(
    name[:-3]
    for name in os.listdir(os.path.join(helpers.REPO, "configs"))
    if name.endswith(".py") and not name.startswith("_") and name != "common.py"
)
# A command-line value per type of an unset key, and what it must parse to.
_SAMPLES = {str: ("gs://b/tfds", "gs://b/tfds"), int: ("7", 7), tuple: ("(0.5,)", (0.5,))}


def _unset_keys(config, prefix=""):
  """Dotted keys whose value is None, with the raw field (a typed placeholder or None)."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      yield from _unset_keys(value, f"{prefix}{key}.")
    elif value is None:
      yield prefix + key, config._fields[key]  # pylint: disable=protected-access


def _parse(spec, *overrides):
  """The config that `python -m bits_jax.main --config=<spec> <overrides>` builds; `spec` is
  'configs/x.py[:preset]' (relative to the repository) or 'x[:preset]'."""
  if not spec.startswith("configs/"):
    name, colon, arg = spec.partition(":")
    spec = f"configs/{name}.py{colon}{arg}"
  argv = ["main", f"--config={os.path.join(helpers.REPO, spec)}", *overrides]
  values = flags.FlagValues()
  # config_flags finds the override flags in sys_argv (sys.argv unless given).
  utils.define_config_flag("", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", _CONFIG_FILES)
def test_unset_keys_are_typed_and_overridable(name):
  unset = dict(_unset_keys(helpers.load_config(name)))
  assert "input.data_dir" in unset  # the key the ImageNet docstrings tell users to set
  untyped = [
      key for key, field in unset.items() if not isinstance(field, config_dict.FieldReference)
  ]
  assert not untyped, f"None without a type cannot be overridden; use placeholder(type): {untyped}"
  flags_in = [f"--config.{key}={_SAMPLES[field.get_type()][0]}" for key, field in unset.items()]
  config = _parse(name, *flags_in)
  for key, field in unset.items():
    assert functools.reduce(getattr, key.split("."), config) == _SAMPLES[field.get_type()][1]


def test_unset_keys_stay_none_without_an_override():
  config = _parse("fashion_mnist")
  assert config.input.data_dir is None
  assert config.input.eval_crop_size is None
  assert config.input.augment.normalize_mean is None


def _documented_commands():
  """(source, config spec, --config.* flags) of each bits_jax.main command in the README, the
  config files' docstrings and the launch scripts; shell variables stand for their defaults."""
  commands = []
  paths = [os.path.join(helpers.REPO, p) for p in ("README.md", "configs/*.py", "scripts/*.sh")]
  for path in sorted(sum((glob.glob(p) for p in paths), [])):
    path = os.path.relpath(path, helpers.REPO)
    with open(os.path.join(helpers.REPO, path)) as f:
      text = re.sub(r"\\\n\s*", " ", f.read())  # one line per command
    for line in re.findall(r"-m bits_jax\.main(.*)", text):
      line = line.replace("$CONFIG", "configs/imagenet_vitb16.py:ep100")  # run_tpu.sh's default
      flags_in = re.findall(r"--config(?:\.[\w.]+)?=[^\s`'\"\]]+", line)
      spec = [f.split("=", 1)[1] for f in flags_in if f.startswith("--config=")]
      if spec and "<" not in spec[0]:  # not a template
        overrides = [re.sub(r"\$(\w+)", r"\1", f) for f in flags_in if f.startswith("--config.")]
        commands.append((path, spec[0], overrides))
  return commands


def _image_folder(root):
  """A two-split image folder standing in for the user's (configs/transfer.py counts it)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for split in ("train", "test"):
    os.makedirs(root / split / "a")
    Image.new("RGB", (8, 8)).save(root / split / "a" / "0.png")
  return root


def test_documented_commands_parse(tmp_path):
  commands = _documented_commands()
  folder = f"imagefolder:{_image_folder(tmp_path)}"
  # The ImageNet and TPU commands set the data directory: the case that once failed.
  assert any("--config.input.data_dir" in " ".join(c[2]) for c in commands if "scripts/" in c[0])
  assert sum("--config.input.data_dir" in " ".join(c[2]) for c in commands) >= 5, commands
  for source, spec, overrides in commands:
    try:
      _parse(re.sub(r"imagefolder:[^,]+", folder, spec), *overrides)
    except Exception as error:  # pylint: disable=broad-except
      pytest.fail(f"{source}: --config={spec} {' '.join(overrides)}: {error}")


def test_options_the_preset_leaves_out_can_be_set():
  """Documented options a config file does not list (the backbone's, an evaluator's) parse as
  Python literals and validate."""
  config = _parse(
      "fashion_mnist",
      "--config.model.remat=True",
      "--config.model.drop_path_rate=0.1",
      "--config.evals.linear.hidden_dim=256",
      "--config.input.crops.global_scale=(0.5, 1.0)",
      "--config.input.crops.global_view_scales=((0.3, 1.0), (1.0, 1.0))",
  )
  assert config.model.remat is True and config.model.drop_path_rate == 0.1
  assert config.input.crops.global_view_scales == ((0.3, 1.0), (1.0, 1.0))
  assert config.evals.linear.hidden_dim == 256
  assert config_validation.config_problems(config) == []


@pytest.mark.parametrize(
    "override,problem",
    [
        ("--config.totl_steps=5", "unknown key config.totl_steps: did you mean 'total_steps'?"),
        ("--config.model.widht=64", "widht"),
        ("--config.evals.knn.kz=5", "config.evals.knn.kz is not an option of the 'knn'"),
    ],
)
def test_a_key_that_is_no_option_is_a_config_problem(override, problem):
  problems = config_validation.config_problems(_parse("fashion_mnist:test", override))
  assert len(problems) == 1 and problem in problems[0], problems


def test_an_override_under_a_missing_section_is_a_flag_error(capsys):
  argv = ["main", f"--config={os.path.join(helpers.REPO, 'configs', 'fashion_mnist.py')}"]
  argv.append("--config.optm.learning_rate=1.0")
  values = flags.FlagValues()
  utils.define_config_flag("", flag_values=values, sys_argv=argv)
  with mock.patch.object(app, "FLAGS", values), pytest.raises(SystemExit) as stop:
    utils.parse_flags(argv)
  assert stop.value.code == 1
  assert 'Did you mean "optim"' in capsys.readouterr().err
