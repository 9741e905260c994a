"""Non-paper objective.bits options (off by default) vs float64 references: teacher_center,
bce_logit_scale."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from bits_jax import config_defaults
from bits_jax.objectives import bits

V, G, N, D = 3, 2, 16, 8  # views, global views, batch, bits


def _config(**overrides):
  settings = config_defaults.objective_defaults().bits
  settings.update(dict(num_bits=D, **overrides))
  return ml_collections.ConfigDict(dict(objective=dict(bits=settings)))


def _np_bce_mean(s, t):
  s = np.asarray(s, np.float64)
  return np.mean(t * np.logaddexp(0, -s) + (1 - t) * np.logaddexp(0, s))


def test_off_by_default_and_stateless():
  config = ml_collections.ConfigDict(dict(objective=config_defaults.objective_defaults()))
  assert not config.objective.bits.teacher_center
  assert bits.init_state(config) == {}


def test_centred_messages_and_center_update_match_numpy():
  rng = np.random.RandomState(0)
  # A large shared offset: uncentred, every bit would be the same for the whole batch.
  student = rng.randn(V, N, D).astype(np.float32)
  teacher = (rng.randn(G, N, D) + 3.0).astype(np.float32)
  center = rng.randn(D).astype(np.float32) + 3.0
  config = _config(teacher_center=True, teacher_center_momentum=0.7)
  assert bits.init_state(config)["center"].shape == (D,)
  loss, (state, metrics) = bits.loss(
      jnp.asarray(student),
      jnp.asarray(teacher),
      {"center": jnp.asarray(center)},
      step=0,
      config=config,
  )
  t64, c64 = teacher.astype(np.float64), center.astype(np.float64)
  msgs = (t64 - c64 > 0).astype(np.float64)
  pairs = [(g, v) for g in range(G) for v in range(V) if v != g]
  agree = np.mean([_np_bce_mean(student[v], msgs[g]) for g, v in pairs])
  np.testing.assert_allclose(metrics["agreement_loss"], agree, rtol=1e-5)
  np.testing.assert_allclose(metrics["bit_balance"], msgs.mean(), rtol=1e-6)
  expected_center = 0.7 * c64 + 0.3 * t64.mean(axis=(0, 1))
  np.testing.assert_allclose(state["center"], expected_center, rtol=1e-5, atol=1e-6)
  # The coding rate does not see the center: same value as without centring.
  _, (_, plain) = bits.loss(
      jnp.asarray(student), jnp.asarray(teacher), {}, step=0, config=_config()
  )
  np.testing.assert_allclose(metrics["coding_rate"], plain["coding_rate"], rtol=1e-6)
  assert 0.0 < float(metrics["bit_balance"]) < 1.0
  assert float(plain["bit_balance"]) > 0.99  # uncentred: (almost) the constant message
  assert np.isfinite(float(loss))


def test_bad_momentum_is_a_config_problem():
  config = _config(teacher_center=True, teacher_center_momentum=1.0)
  problems = bits.config_problems(config)
  assert any("teacher_center_momentum" in p for p in problems), problems
  assert not bits.config_problems(_config(teacher_center=True))


def test_bce_logit_scale_matches_numpy_and_ignores_the_norm():
  rng = np.random.RandomState(1)
  student = rng.randn(V, N, D).astype(np.float32)
  teacher = rng.randn(G, N, D).astype(np.float32)
  config = _config(bce_logit_scale=2.0)
  _, (_, metrics) = bits.loss(jnp.asarray(student), jnp.asarray(teacher), {}, step=0, config=config)
  s64 = student.astype(np.float64)
  scaled = 2.0 * np.sqrt(D) * s64 / np.linalg.norm(s64, axis=-1, keepdims=True)
  msgs = (teacher > 0).astype(np.float64)
  pairs = [(g, v) for g in range(G) for v in range(V) if v != g]
  agree = np.mean([_np_bce_mean(scaled[v], msgs[g]) for g, v in pairs])
  np.testing.assert_allclose(metrics["agreement_loss"], agree, rtol=1e-5)
  # agreement_bce stays the plain mean BCE of the raw logits (comparable across settings).
  plain = np.mean([_np_bce_mean(s64[v], msgs[g]) for g, v in pairs])
  np.testing.assert_allclose(metrics["agreement_bce"], plain, rtol=1e-5)
  _, (_, larger) = bits.loss(
      jnp.asarray(10.0 * student), jnp.asarray(teacher), {}, step=0, config=config
  )
  np.testing.assert_allclose(larger["agreement_loss"], metrics["agreement_loss"], rtol=1e-5)
  assert any("bce_logit_scale" in p for p in bits.config_problems(_config(bce_logit_scale=-1.0)))
