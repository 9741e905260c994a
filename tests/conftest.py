"""Test setup: fake an 8-device CPU mesh before JAX is imported anywhere; shared fixtures."""

import atexit
import os
import shutil
import sys
import tempfile

_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
# Compiling, not running, is most of the suite's time on a CPU (small models, many programs):
# LLVM at -O0 compiles the train steps ~1.6x faster. The tests check the math, which does not
# depend on the level; a level the user set is kept.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
# Added to (not instead of) the user's XLA_FLAGS: GPU hosts often set some.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = f"{_flags} {_FAKE_DEVICES}"
if "xla_backend_optimization_level" not in _flags:
  _flags = f"{_flags} {_FAST_COMPILE}"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent XLA compilation cache for the session (a user's own is kept), read by the
# subprocesses the tests start too: the many short runs of the same small configs compile
# each program once instead of once per run.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bits_jax_tests_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `configs` is a package at the repository root
  sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def tiny_config():
  """The fashion_mnist test preset (a 1-block ViT, 32 bits, batch 16, 6 steps)."""
  import helpers  # pylint: disable=g-import-not-at-top

  return helpers.load_config("fashion_mnist", "test")


@pytest.fixture
def assert_trees_close():
  """assert_trees_close(a, b, rtol=..., atol=...): every leaf of two pytrees close."""
  import jax  # pylint: disable=g-import-not-at-top

  def check(a, b, **tolerances):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerances)

  return check
