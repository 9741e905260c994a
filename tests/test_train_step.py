"""The pure train step: sharding invariance, head re-init, numerical guard, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from bits_jax import sharding as sharding_lib
from bits_jax import train_state
from bits_jax import train_step
from tests import helpers


def _run_steps(config, devices, batches):
  mesh = sharding_lib.make_mesh(config, devices)
  repl = sharding_lib.replicated(mesh)
  state = jax.jit(lambda: train_state.create_train_state(config, jax.random.PRNGKey(0)),
                  out_shardings=repl)()
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step = train_step.compile_train_step(config, mesh, state_sharding)
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def config():
  config = helpers.load_config("fashion_mnist", "test")
  config.batch_size = 16
  return config


def test_sharded_step_equals_single_device(config):
  batches = [helpers.random_batch(config, seed=s) for s in range(2)]
  single, m1 = _run_steps(config, jax.devices()[:1], batches)
  sharded, m8 = _run_steps(config, jax.devices()[:8], batches)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["coding_rate"], b["coding_rate"], rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
      single.params, sharded.params)
  assert int(sharded.step) == 2


def test_metrics_logged(config):
  _, metrics = _run_steps(config, jax.devices()[:1], [helpers.random_batch(config)])
  for key in ("loss", "agreement_bce", "coding_rate", "bit_balance", "bit_entropy",
              "agreement_accuracy", "teacher_momentum", "learning_rate"):
    assert key in metrics[0] and np.isfinite(metrics[0][key]), key


def test_head_reinit_changes_head_keeps_backbone_resets_moments(config):
  state = train_state.create_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: train_step.train_step(s, b, config=config))
  state, _ = step(state, helpers.random_batch(config))
  state = state.replace(step=jnp.asarray(config.head_reinit_every, jnp.int32))
  new = train_state.reinit_head(state, config)

  # Kernels are redrawn (biases start at zero in both).
  for name, layer in new.params["head"].items():
    assert not np.allclose(layer["kernel"], state.params["head"][name]["kernel"]), name
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         state.params["backbone"], new.params["backbone"])
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         new.params["head"], new.teacher_params["head"])
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         state.teacher_params["backbone"], new.teacher_params["backbone"])

  def moments(opt_state, group):
    adam = opt_state[1].inner_states[group].inner_state.inner_state[0]
    return adam
  old_head, new_head = moments(state.opt_state, "head"), moments(new.opt_state, "head")
  assert any(np.abs(x).sum() > 0 for x in jax.tree_util.tree_leaves(old_head.mu))
  for x in jax.tree_util.tree_leaves((new_head.mu, new_head.nu)):
    np.testing.assert_array_equal(x, 0.0)
  assert int(new_head.count) == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         moments(state.opt_state, "backbone").mu,
                         moments(new.opt_state, "backbone").mu)


def test_reinit_happens_inside_train_step(config):
  state = train_state.create_train_state(config, jax.random.PRNGKey(0))
  state = state.replace(step=jnp.asarray(config.head_reinit_every, jnp.int32))
  expected_head = train_state.reinit_head(state, config).params["head"]
  zero_lr = config.copy_and_resolve_references()
  zero_lr.learning_rate = 0.0
  zero_lr.min_learning_rate = 0.0
  new, _ = jax.jit(lambda s, b: train_step.train_step(s, b, config=zero_lr))(
      state, helpers.random_batch(config))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
                         new.params["head"], expected_head)


def test_nonfinite_batch_skips_update(config):
  state = train_state.create_train_state(config, jax.random.PRNGKey(0))
  batch = helpers.random_batch(config)
  batch["global"][0, 0, 0, 0, 0] = np.nan
  new, metrics = train_step.train_step(state, batch, config=config)
  assert float(metrics["update_skipped"]) == 1.0
  assert int(new.skipped_steps) == 1 and int(new.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, new.params)


def test_batch_not_divisible_by_devices():
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  with pytest.raises(ValueError, match="not divisible by the 8 devices.*multiple of 8"):
    sharding_lib.check_batch_divisible(12, mesh)


def test_image_not_divisible_by_patch(config):
  bad = config.copy_and_resolve_references()
  bad.global_crop_size = 30
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    train_state.create_train_state(bad, jax.random.PRNGKey(0))
