"""The pure train step: sharding invariance, head re-init, numerical guard, bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from bits_jax import objectives
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
  config.log_term_grad_norms = True  # the per-term gradients on the logged steps too
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


def test_term_grad_norms_on_logged_steps_only(single_device_run):
  _, metrics = single_device_run  # log_every=2: step 0 is not logged, step 1 is
  for key in (
      "grad_norm/agreement",
      "grad_norm/coding_rate",
      "grad_norm/agreement_backbone",
      "grad_norm/coding_rate_backbone",
  ):
    assert np.isnan(metrics[0][key]), key
    assert np.isfinite(metrics[1][key]) and metrics[1][key] > 0, key
  assert metrics[1]["grad_norm/agreement_backbone"] <= metrics[1]["grad_norm/agreement"]


def test_term_grads_equal_the_gradient_of_each_term_alone(config, assert_trees_close):
  components = train_state.build(config)
  state = train_state.create(components, config, jax.random.PRNGKey(1))
  batch = helpers.random_batch(config, seed=5)

  def grads_of(cfg, now):
    fn = lambda s, b: train_step.loss_and_grads(s, b, components, cfg, term_grads_now=now)
    _, _, metrics, grads = jax.jit(fn)(state, batch)
    return metrics, grads

  metrics, total = grads_of(config, jnp.asarray(True))
  only = {}
  for term, zeroed in (("agreement", "coding_rate_weight"), ("coding_rate", "bce_weight")):
    cfg = config.copy_and_resolve_references()
    cfg.objective.bits[zeroed] = 0.0
    only[term] = grads_of(cfg, None)[1]
    assert_trees_close(metrics["term_grads"][term], only[term], rtol=2e-3, atol=1e-6)
  summed = jax.tree_util.tree_map(jnp.add, only["agreement"], only["coding_rate"])
  assert_trees_close(total, summed, rtol=2e-3, atol=1e-6)


class _NoisyBackbone(nn.Module):
  """Adds N(0, 1) to its features when it runs in train mode with a "drop_path" rng."""

  feature_dim: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(self.feature_dim)(jnp.mean(x, axis=(1, 2)))
    if train and self.has_rng("drop_path"):
      h = h + jax.random.normal(self.make_rng("drop_path"), h.shape)
    return {"cls": h}


def test_drop_path_rng_reaches_the_student_only(config):
  def probe(student, teacher, state, *, step, config, batch_shards=1):
    del step, config, batch_shards
    return jnp.sum(student), (state, {"student": student, "teacher": teacher})

  components = dataclasses.replace(
      train_state.build(config),
      backbone=_NoisyBackbone(),
      objective=dataclasses.replace(objectives.get("bits"), loss=probe),
  )
  state = train_state.create(components, config, jax.random.PRNGKey(0))
  batch = helpers.random_batch(config)
  run = jax.jit(lambda s: train_step.loss_and_grads(s, batch, components, config)[2])
  at = lambda step: run(state.replace(step=jnp.asarray(step, jnp.int32)))
  clean = components.student.apply({"params": state.params}, batch["global"], train=True)
  m0, m0_again, m1 = at(0), at(0), at(1)
  np.testing.assert_allclose(m0["teacher"], clean, rtol=1e-5, atol=1e-6)  # no noise
  np.testing.assert_allclose(m1["teacher"], clean, rtol=1e-5, atol=1e-6)
  num_global = clean.shape[0]
  assert not np.allclose(m0["student"][:num_global], clean, rtol=0.1, atol=0)
  np.testing.assert_array_equal(m0["student"], m0_again["student"])  # a function of the step
  assert not np.allclose(m0["student"], m1["student"], rtol=0.1, atol=0)


def test_ynn_fusion_option_applies_to_cpu_meshes_only(config):
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  off = config.copy_and_resolve_references()
  off.xla_cpu_ynn_fusion = False
  assert train_step.compiler_options(off, mesh) == {"xla_cpu_experimental_ynn_fusion_type": ""}
  on = config.copy_and_resolve_references()
  on.xla_cpu_ynn_fusion = True
  assert train_step.compiler_options(on, mesh) is None


def test_logit_grad_norms_on_every_step(single_device_run):
  _, metrics = single_device_run
  for m in metrics:
    for key in ("grad_norm/agreement_logits", "grad_norm/coding_rate_logits"):
      assert np.isfinite(m[key]) and m[key] > 0, key


def test_logit_grad_norms_are_each_terms_gradient():
  logits = jnp.arange(6.0).reshape(1, 2, 3) - 2.0

  def objective_loss(out):
    terms = {"a": jnp.sum(out**2), "b": 3.0 * jnp.sum(out)}
    return terms["a"] + terms["b"], ({}, {objectives.common.LOSS_TERMS: terms})

  norms = jax.jit(lambda o: train_step.logit_grad_norms(objective_loss, o))(logits)
  np.testing.assert_allclose(norms["grad_norm/a_logits"], 2 * np.linalg.norm(logits), rtol=1e-6)
  np.testing.assert_allclose(norms["grad_norm/b_logits"], 3 * np.sqrt(6), rtol=1e-6)
  single = lambda out: (jnp.sum(out), ({}, {objectives.common.LOSS_TERMS: {"a": jnp.sum(out)}}))
  assert train_step.logit_grad_norms(single, logits) == {}
