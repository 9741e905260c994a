"""bits_jax.utils: schedule lengths, config files, normalisation, finiteness."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bits_jax import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(**values):
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize(
    "values,steps_per_epoch,expected",
    [
        ({"reset_every_steps": 40, "reset_every_epochs": 0}, 100, 40),
        ({"reset_every_steps": 0, "reset_every_epochs": 10}, 100, 1000),
        ({"reset_every_steps": 0, "reset_every_epochs": 0.5}, 7, 4),  # rounded
        ({"reset_every_steps": 0, "reset_every_epochs": 0.01}, 7, 1),  # at least one step
        ({"reset_every_steps": 0, "reset_every_epochs": 0}, 100, 0),  # never
        ({}, None, 0),  # neither key: never
        ({"reset_every_steps": 12}, None, 12),  # steps need no epoch length
    ],
)
def test_steps_from_steps_or_epochs(values, steps_per_epoch, expected):
  assert utils.steps(_section(**values), "reset_every", steps_per_epoch) == expected


def test_steps_and_epochs_both_set_is_an_error():
  section = _section(reset_every_steps=5, reset_every_epochs=2)
  with pytest.raises(ValueError, match="both reset_every_steps=5 and reset_every_epochs=2"):
    utils.steps(section, "reset_every", 100)


def test_epochs_without_an_epoch_length_is_an_error():
  section = _section(reset_every_steps=0, reset_every_epochs=2)
  with pytest.raises(ValueError, match="needs the number of training examples"):
    utils.steps(section, "reset_every", None)


def test_load_config_file_with_preset():
  config = utils.load_config_file(os.path.join(REPO, "configs", "fashion_mnist.py") + ":test,dino")
  assert config.objective.name == "dino" and config.total_steps == 6
  assert utils.load_config_file(os.path.join(REPO, "configs", "fashion_mnist.py")).total_steps > 6


def test_load_config_file_missing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="'configs/nope.py' not found"):
    utils.load_config_file("configs/nope.py")
  with pytest.raises(FileNotFoundError, match="not found"):
    utils.load_config_file("configs/nope.py:test")


def test_l2_normalize_unit_rows_and_zero_rows():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0], [-2.0, 0.0]])
  y = np.asarray(utils.l2_normalize(x))
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y[0], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(y[1], [0.0, 0.0])  # zero rows stay zero, no NaN
  assert abs(y[2, 0]) < 1e-6  # tiny rows are not blown up to unit norm
  np.testing.assert_allclose(y[3], [-1.0, 0.0], rtol=1e-6)
  cols = np.asarray(utils.l2_normalize(x, axis=0))
  np.testing.assert_allclose(np.linalg.norm(cols, axis=0), 1.0, rtol=1e-5)


def test_tree_all_finite():
  finite = {"a": jnp.ones((2, 3)), "b": [jnp.zeros(4, jnp.bfloat16)], "step": jnp.int32(3)}
  assert bool(utils.tree_all_finite(finite))
  assert bool(utils.tree_all_finite({"step": jnp.int32(3)}))  # no floating leaf
  assert bool(utils.tree_all_finite({}))
  for bad in (np.nan, np.inf, -np.inf):
    tree = dict(finite, b=[jnp.asarray([0.0, bad, 1.0], jnp.bfloat16)])
    assert not bool(utils.tree_all_finite(tree)), bad
  assert not bool(utils.tree_all_finite({"a": jnp.asarray(np.float32(np.nan))}))


_ANNOUNCE = """
import sys
from absl import app
from bits_jax import utils

def main(_):
  utils.announce("damaged step moved")
  utils.announce("resuming", warn=False)
  utils.quiet_absl_logging()  # what every CLI does after flag parsing
  utils.announce("resuming quietly", warn=False)

if sys.argv[1:] == ["plain"]:  # a notebook or script: no absl handler installed
  main(None)
else:
  app.run(main)
"""


@pytest.mark.parametrize("mode", ["app", "plain"])
def test_announce_shows_each_message_once(mode, tmp_path):
  # The checkpoint and lock messages were logged to stderr by absl and printed too.
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  script = tmp_path / "announce.py"
  script.write_text(_ANNOUNCE)
  result = subprocess.run(
      [sys.executable, str(script), mode],
      capture_output=True,
      text=True,
      check=True,
      cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  output = result.stdout + result.stderr
  for message in ("damaged step moved", "resuming", "resuming quietly"):
    lines = [line for line in output.splitlines() if line.endswith(message)]
    assert len(lines) == 1, (message, output)
  if mode == "app":
    assert "announce.py:" in output  # absl logs the caller's line, not announce's
