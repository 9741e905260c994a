"""config.init_from_head: continued SSL keeps the checkpoint's head ('keep') or a fresh one."""

import jax
import numpy as np
import pytest

from bits_jax import config_validation
from bits_jax import train
from bits_jax import train_state
from bits_jax import weights
from tests import helpers


def _tiny_config():
  config = helpers.load_config("fashion_mnist", "test")
  for entry in config.evals.values():
    entry.at_end = False
  return config


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
  """(config, dir) of a params directory {'backbone', 'head'} drawn with another seed."""
  config = _tiny_config()
  components = train_state.build(config)
  params, _ = train_state.init_variables(components, jax.random.PRNGKey(7))
  directory = str(tmp_path_factory.mktemp("params"))
  weights.save_params(directory, jax.device_get(params))
  return config, directory


def _init_from(config, workdir, mode):
  config = config.copy_and_resolve_references()
  config.init_from = workdir
  with config.unlocked():
    config.init_from_head = mode
  components = train_state.build(config)
  fresh = train_state.create(components, config, jax.random.PRNGKey(123))
  return fresh, train.init_backbone_from(fresh, config)


def _equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves(jax.device_get(a)), jax.tree_util.tree_leaves(b)
  return len(flat_a) == len(flat_b) and all(np.array_equal(x, y) for x, y in zip(flat_a, flat_b))


def _check(config, source, mode):
  loaded, _ = weights.load_params(source)
  fresh, state = _init_from(config, source, mode)
  for params in (state.params, state.teacher_params):
    assert _equal(params["backbone"], loaded["backbone"])
    if mode == "keep":
      assert _equal(params["head"], loaded["head"])
    else:
      assert _equal(params["head"], fresh.params["head"])
      assert not _equal(params["head"], loaded["head"])
  # The fresh state differs from the loaded weights, so the equalities above are not vacuous.
  assert not _equal(fresh.params["head"], loaded["head"])
  assert not _equal(fresh.params["backbone"], loaded["backbone"])


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_params_dir_head_kept_or_fresh(params_dir, mode):
  _check(*params_dir, mode)


@pytest.mark.slow
def test_trained_checkpoint_head_kept_or_fresh(tmp_path):
  """A real train-state checkpoint after 2 steps (~1-2 min on 2 CPU cores: compilation)."""
  config = _tiny_config()
  workdir = str(tmp_path / "pretrain")
  train.train(config, workdir, stop_at_step=2)
  assert weights.load_params(workdir)[1] == 2
  for mode in ("keep", "reset"):
    _check(config, workdir, mode)


def test_keep_errors_name_the_key(params_dir, tmp_path):
  config, source = params_dir
  with pytest.raises(ValueError, match="use 'keep' or 'reset'"):
    _init_from(config, source, "sometimes")
  # Another channel size: the head does not fit.
  other = config.copy_and_resolve_references()
  other.objective.bits.num_bits = 16
  with pytest.raises(ValueError, match=r"num_bits.*init_from_head='reset'"):
    _init_from(other, source, "keep")
  _init_from(other, source, "reset")  # a fresh head of the new size is fine
  # Backbone-only (converted) weights have no head to keep.
  loaded, _ = weights.load_params(source)
  backbone_only = str(tmp_path / "converted")
  weights.save_params(backbone_only, {"backbone": loaded["backbone"]})
  with pytest.raises(ValueError, match="no projection head.*init_from_head='reset'"):
    _init_from(config, backbone_only, "keep")


def _buffers(tree):
  """The device buffer addresses of every leaf (every shard) of `tree`."""
  return [
      shard.data.unsafe_buffer_pointer()
      for leaf in jax.tree_util.tree_leaves(tree)
      for shard in leaf.addressable_shards
  ]


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_student_and_teacher_share_no_buffer(params_dir, mode):
  """The step donates the state: a buffer in two leaves would be donated twice ("Attempt to
  donate the same buffer twice", the first step of every init_from run)."""
  fresh, state = _init_from(*params_dir, mode)
  addresses = _buffers(state)
  assert len(addresses) == len(set(addresses))
  shardings = lambda tree: [x.sharding for x in jax.tree_util.tree_leaves(tree)]
  assert shardings(state) == shardings(fresh)


def test_missing_init_from_is_a_config_error_and_writes_no_config(tmp_path):
  config = _tiny_config()
  config.init_from = str(tmp_path / "no_such_run")
  workdir = tmp_path / "run"
  with pytest.raises(config_validation.ConfigError, match="config.init_from: .*no_such_run"):
    train.train(config, str(workdir), devices=jax.devices()[:1])
  assert not (workdir / "config.json").exists()
