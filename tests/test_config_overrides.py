"""Every key of every config file can be set from the command line, unset ones (None) too."""

import functools
import os

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags
import pytest

import helpers

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


def _parse(name, *overrides):
  """The config that `python -m bits_jax.main --config=configs/<name>.py ...` builds."""
  argv = ["main", f"--config={os.path.join(helpers.REPO, 'configs', name)}.py", *overrides]
  values = flags.FlagValues()
  # config_flags finds the override flags in sys_argv (sys.argv unless given).
  config_flags.DEFINE_config_file(
      "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
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
