"""The pure train step: sharding invariance, head re-init, numerical guard, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from bits_jax import sharding as sharding_lib
from bits_jax import train_state
from bits_jax import train_step
import helpers


def _run_steps(config, devices, batches):
  mesh = sharding_lib.make_mesh(config, devices)
  components, state = helpers.create_state(config, mesh)
  step = train_step.compile_train_step(components, config, mesh, sharding_lib.shardings_of(state))
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def config():
  config = helpers.load_config("fashion_mnist", "test")
  config.input.batch_size = 16
  return config


@pytest.fixture(scope="module")
def batches(config):
  return [helpers.random_batch(config, seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def single_device_run(config, batches):
  """(state, metrics of each step) after the `batches` on one device."""
  return _run_steps(config, jax.devices()[:1], batches)


@pytest.fixture(scope="module")
def jitted_step(config):
  """(components, the jitted train step) of `config`."""
  components = train_state.build(config)
  return components, jax.jit(train_step.make_train_step(components, config))


def test_sharded_step_equals_single_device(config, batches, single_device_run, assert_trees_close):
  single, m1 = single_device_run
  sharded, m8 = _run_steps(config, jax.devices()[:8], batches)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["coding_rate"], b["coding_rate"], rtol=1e-5, atol=1e-5)
  assert_trees_close(single.params, sharded.params, rtol=1e-5, atol=1e-5)
  assert int(sharded.step) == 2


def test_metrics_logged(single_device_run):
  _, metrics = single_device_run
  for key in (
      "loss",
      "agreement_bce",
      "coding_rate",
      "bit_balance",
      "bit_entropy",
      "agreement_accuracy",
      "teacher_momentum",
      "learning_rate",
  ):
    assert key in metrics[0] and np.isfinite(metrics[0][key]), key


def test_head_reinit_changes_head_keeps_backbone_resets_moments(config, jitted_step):
  components, step = jitted_step
  state = train_state.create(components, config, jax.random.PRNGKey(config.seed))
  state, _ = step(state, helpers.random_batch(config))
  assert components.head_reset_every == config.objective.head.reset_every_steps > 0
  state = state.replace(step=jnp.asarray(components.head_reset_every, jnp.int32))
  new = train_state.reset_head(state, components)

  # Kernels are redrawn (biases start at zero in both).
  for name, layer in new.params["head"].items():
    assert not np.allclose(layer["kernel"], state.params["head"][name]["kernel"]), name
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, state.params["backbone"], new.params["backbone"]
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, new.params["head"], new.teacher_params["head"]
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      state.teacher_params["backbone"],
      new.teacher_params["backbone"],
  )

  def moments(opt_state, group):
    adam = opt_state[1].inner_states[group].inner_state.inner_state[0]
    return adam

  old_head, new_head = moments(state.opt_state, "head"), moments(new.opt_state, "head")
  assert any(np.abs(x).sum() > 0 for x in jax.tree_util.tree_leaves(old_head.mu))
  for x in jax.tree_util.tree_leaves((new_head.mu, new_head.nu)):
    np.testing.assert_array_equal(x, 0.0)
  assert int(new_head.count) == 0
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      moments(state.opt_state, "backbone").mu,
      moments(new.opt_state, "backbone").mu,
  )


def test_reinit_happens_inside_train_step(config, jitted_step, assert_trees_close):
  components, _ = jitted_step
  state = train_state.create(components, config, jax.random.PRNGKey(config.seed))
  state = state.replace(step=jnp.asarray(components.head_reset_every, jnp.int32))
  assert train_state.head_reset_due(state.step, components)
  expected_head = train_state.reset_head(state, components).params["head"]
  zero_lr = config.copy_and_resolve_references()
  zero_lr.optim.learning_rate = 0.0
  zero_lr.optim.end_learning_rate = 0.0
  step = train_step.make_train_step(train_state.build(zero_lr), zero_lr)
  new, _ = jax.jit(step)(state, helpers.random_batch(config))
  assert_trees_close(new.params["head"], expected_head, atol=1e-7)


def test_nonfinite_batch_skips_update(config, jitted_step):
  components, step = jitted_step
  state = train_state.create(components, config, jax.random.PRNGKey(config.seed))
  batch = helpers.random_batch(config)
  batch["global"][0, 0, 0, 0, 0] = np.nan
  new, metrics = step(state, batch)
  assert float(metrics["update_skipped"]) == 1.0
  assert int(new.skipped_steps) == 1 and int(new.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, new.params)


def test_batch_not_divisible_by_devices():
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  with pytest.raises(ValueError, match="not divisible by the 8 devices.*multiple of 8"):
    sharding_lib.check_batch_divisible(12, mesh)


def test_image_not_divisible_by_patch(config):
  bad = config.copy_and_resolve_references()
  bad.input.crops.global_size = 30
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    train_state.create(train_state.build(bad), bad, jax.random.PRNGKey(0))
