"""SimDINO loss against its formula; every registered method trains through one interface."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bits_jax import objectives
from bits_jax import train_step
from bits_jax.objectives import simdino
import helpers


def _config(**overrides):
  """`config.objective.simdino` is all the loss reads (defaults: SimDINO's code's)."""
  settings = dict(
      eps=0.5, coding_rate_weight=1.0, rate_views="student_teacher", rate_scope="device"
  )
  settings.update(overrides)
  return ml_collections.ConfigDict(dict(objective=dict(simdino=settings)))


def numpy_simdino(student, teacher, eps, weight, views="student_teacher", shards=1):
  """float64: mean_{g, v != g} mean_b 0.5 ||zs_v - zt_g||^2 - w (d+n)/(dn) mean_g R_eps(w_g),

  w_g = (zs_g + zt_g) / 2 ('student_teacher', SimDINO's expa_type=1) or zs_g; R averaged over
  `shards` contiguous row blocks W_k, each 0.5 logdet(I + d / (n eps) W_k^T W_k) with the
  global n (SimDINO's per-GPU Gram matrices, reduce_cov=0).
  """
  student, teacher = np.float64(student), np.float64(teacher)
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  zs, zt = normalize(student), normalize(teacher)
  distances = [
      np.mean(0.5 * np.sum((zs[v] - zt[g]) ** 2, axis=-1))
      for g in range(teacher.shape[0])
      for v in range(student.shape[0])
      if v != g
  ]
  n, d = student.shape[1], student.shape[2]
  rates = []
  for g in range(teacher.shape[0]):
    w = (zs[g] + zt[g]) / 2 if views == "student_teacher" else zs[g]
    blocks = np.split(w, shards)
    rates.append(
        np.mean([0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps) * b.T @ b)[1] for b in blocks])
    )
  return np.mean(distances) - weight * (d + n) / (d * n) * np.mean(rates), np.mean(distances)


@pytest.mark.parametrize(
    "n,d,weight,views,scope,shards",
    [
        (8, 16, 1.0, "student_teacher", "device", 1),
        (32, 8, 0.5, "student_teacher", "device", 4),
        (12, 12, 2.0, "student", "global", 3),  # 'global' ignores the 3 devices
        (12, 6, 1.0, "student", "device", 2),
    ],
)
def test_loss_matches_numpy(n, d, weight, views, scope, shards):
  rng = np.random.RandomState(n + d)
  student = rng.randn(5, n, d).astype(np.float32)  # 2 global + 3 local views
  teacher = rng.randn(2, n, d).astype(np.float32)
  config = _config(coding_rate_weight=weight, rate_views=views, rate_scope=scope)
  loss, (state, metrics) = simdino.loss(
      jnp.asarray(student), jnp.asarray(teacher), {}, step=0, config=config, batch_shards=shards
  )
  ref_shards = shards if scope == "device" else 1
  ref, ref_distance = numpy_simdino(student, teacher, 0.5, weight, views, ref_shards)
  np.testing.assert_allclose(loss, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["distance"], ref_distance, rtol=1e-5)
  assert state == {}


def test_identical_views_have_zero_distance():
  z = np.random.RandomState(0).randn(1, 8, 4).astype(np.float32)
  _, (_, metrics) = simdino.loss(
      jnp.asarray(np.concatenate([z, z, 3 * z])),
      jnp.asarray(np.concatenate([z, 2 * z])),
      {},
      step=0,
      config=_config(),
  )
  np.testing.assert_allclose(metrics["distance"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["cosine_similarity"], 1.0, atol=1e-6)


def test_no_gradient_to_teacher():
  rng = np.random.RandomState(1)
  s = jnp.asarray(rng.randn(3, 8, 4).astype(np.float32))
  t = jnp.asarray(rng.randn(2, 8, 4).astype(np.float32))
  gs, gt = jax.grad(
      lambda s, t: simdino.loss(s, t, {}, step=0, config=_config())[0], argnums=(0, 1)
  )(s, t)
  assert np.all(np.isfinite(gs)) and np.abs(gs).sum() > 0
  np.testing.assert_array_equal(gt, 0.0)


@pytest.mark.parametrize("method", sorted(objectives.NAMES))
def test_every_method_trains_through_the_shared_step(method):
  """One config key switches the method; backbone, data, schedule and step are shared."""
  config = helpers.load_config("fashion_mnist", f"test,{method}")
  assert config.objective.name == method
  objective = objectives.get(method)
  for attr in ("name", "make_head", "init_state", "loss"):
    assert hasattr(objective, attr), (method, attr)
  assert objective.name == method
  if method == "bits":
    return  # its train step is tests/test_train_step.py
  components, state = helpers.create_state(config)
  step = jax.jit(train_step.make_train_step(components, config))
  new = state
  for seed in range(2):  # step 0 has learning rate 0 (warm-up)
    new, metrics = step(new, helpers.random_batch(config, seed=seed))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 0.0
  assert not np.allclose(
      new.params["backbone"]["patch_embed"]["kernel"],
      state.params["backbone"]["patch_embed"]["kernel"],
  )


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown method 'byol'.*'dino'.*'simdino'"):
    objectives.get("byol")


def test_config_problems_name_the_fix():
  assert simdino.config_problems(_config()) == []
  assert (
      "config.objective.simdino.eps=0.0 must be > 0" in simdino.config_problems(_config(eps=0.0))[0]
  )
  problems = simdino.config_problems(_config(rate_views="teacher", rate_scope="host"))
  assert problems == [
      "config.objective.simdino.rate_views='teacher': use one of ('student', 'student_teacher').",
      "config.objective.simdino.rate_scope='host': use one of ('global', 'device').",
  ]
