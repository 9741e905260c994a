"""Head resets for every method (`config.objective.head.reset_*`), optimizer state kept or reset."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bits_jax import train_state
from bits_jax import train_step
import helpers


def _head_moments(opt_state):
  return opt_state[1].inner_states["head"].inner_state.inner_state[0]


@pytest.mark.parametrize("reset_optimizer_state", [True, False])
def test_reset_optimizer_state_option(reset_optimizer_state):
  config = helpers.load_config("fashion_mnist", "test")
  config.objective.head.reset_optimizer_state = reset_optimizer_state
  components = train_state.build(config)
  assert components.reset_head_optimizer is reset_optimizer_state
  state = train_state.create(components, config, jax.random.PRNGKey(0))
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  _, opt_state = jax.jit(components.optimizer.update)(grads, state.opt_state, state.params)
  state = state.replace(opt_state=opt_state, step=jnp.asarray(4, jnp.int32))
  old = _head_moments(state.opt_state)
  new_state = jax.jit(lambda s: train_state.reset_head(s, components))(state)
  new = _head_moments(new_state.opt_state)
  assert int(old.count) == 1 and any(np.abs(x).sum() > 0 for x in jax.tree_util.tree_leaves(old.mu))
  if reset_optimizer_state:
    assert int(new.count) == 0
    for x in jax.tree_util.tree_leaves((new.mu, new.nu)):
      np.testing.assert_array_equal(x, 0.0)
  else:
    jax.tree_util.tree_map(np.testing.assert_array_equal, (old.mu, old.nu), (new.mu, new.nu))
    assert int(new.count) == 1
  # The head itself is redrawn either way.
  assert not np.allclose(
      new_state.params["head"]["dense0"]["kernel"], state.params["head"]["dense0"]["kernel"]
  )


def test_paper_head_shape_and_init():
  config = helpers.load_config("fashion_mnist", "test")
  config.objective.head.update(dict(hidden_dim=256, bottleneck_dim=0, num_layers=3))
  config.objective.bits.num_bits = 64
  components = train_state.build(config)
  head = train_state.init_head_params(components, jax.random.PRNGKey(3))
  width = components.backbone.feature_dim
  shapes = {k: v["kernel"].shape for k, v in head.items()}
  assert shapes == {"dense0": (width, 256), "dense1": (256, 256), "logits": (256, 64)}
  for layer in head.values():
    np.testing.assert_array_equal(layer["bias"], 0.0)
    kernel = np.asarray(layer["kernel"])
    assert np.abs(kernel).max() <= 2 * 0.02 + 1e-6  # truncated at 2 std
    assert 0.012 < kernel.std() < 0.02  # truncated normal(0.02) has std ~0.0176
  config.objective.head.bottleneck_dim = 32
  head = train_state.init_head_params(train_state.build(config), jax.random.PRNGKey(3))
  assert head["bottleneck"]["kernel"].shape == (256, 32) and head["logits"]["kernel"].shape == (
      32,
      64,
  )


@pytest.mark.parametrize("method", ["dino", "simdino"])
def test_baseline_heads_reset_in_the_train_step(method):
  config = helpers.load_config("fashion_mnist", f"test,{method}")
  config.objective.head.reset_every_steps = 2
  config.optim.learning_rate = 0.0  # nothing moves but the reset
  config.optim.end_learning_rate = 0.0
  config.log_term_grad_norms = False
  components = train_state.build(config)
  assert components.head_reset_every == 2
  state = train_state.create(components, config, jax.random.PRNGKey(0))
  step = jax.jit(train_step.make_train_step(components, config))
  batch = helpers.random_batch(config)
  before, _ = step(state, batch)  # step 0 -> 1: no reset
  after, _ = step(before.replace(step=jnp.asarray(2, jnp.int32)), batch)  # reset at step 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["head"], before.params["head"])
  expected = train_state.reset_head(
      before.replace(step=jnp.asarray(2, jnp.int32)), components
  ).params["head"]
  # The same draws; compiled into the step, the truncated normal may round differently.
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-8)
  jax.tree_util.tree_map(close, expected, after.params["head"])
  changed = [
      not np.allclose(a, b)
      for a, b in zip(
          jax.tree_util.tree_leaves(before.params["head"]),
          jax.tree_util.tree_leaves(after.params["head"]),
      )
      if np.abs(a).sum() > 0  # biases start at zero in both
  ]
  assert changed and all(changed)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, before.params["backbone"], after.params["backbone"]
  )
  jax.tree_util.tree_map(close, after.params["head"], after.teacher_params["head"])


def test_reset_every_epochs_resolves_for_any_method():
  config = helpers.load_config("fashion_mnist", "test,simdino")
  config.objective.head.reset_every_epochs = 2
  assert train_state.build(config, steps_per_epoch=3).head_reset_every == 6
  config.objective.head.reset_every_epochs = 0
  assert train_state.build(config, steps_per_epoch=3).head_reset_every == 0
