"""BITS loss and coding rate against numpy references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bits_jax import config_defaults
from bits_jax import objectives
from bits_jax.objectives import bits
from bits_jax.objectives import coding_rate as cr


def numpy_coding_rate(z, eps):
  z = np.asarray(z, np.float64)
  n, d = z.shape
  zn = z / np.linalg.norm(z, axis=1, keepdims=True)
  _, logdet = np.linalg.slogdet(np.eye(d) + d / (n * eps) * zn.T @ zn)
  return 0.5 * logdet


def numpy_bce(logits, targets):
  logits = np.asarray(logits, np.float64)
  p = 1.0 / (1.0 + np.exp(-logits))
  return np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def _config(**overrides):
  """`config.objective.bits` (the defaults) is all the loss reads."""
  settings = config_defaults.objective_defaults().bits
  settings.update(dict(dict(bce_weight=1.0, coding_rate_weight=0.1, eps=0.05), **overrides))
  return ml_collections.ConfigDict(dict(objective=dict(bits=settings)))


@pytest.mark.parametrize("n,d", [(8, 32), (64, 16), (20, 20)])
def test_coding_rate_matches_slogdet(n, d):
  z = np.random.RandomState(n * d).randn(n, d).astype(np.float32)
  got = cr.coding_rate(jnp.asarray(z), 0.05)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, numpy_coding_rate(z, 0.05), rtol=1e-4)


def test_coding_rate_float32_under_bfloat16_input():
  z = np.random.RandomState(0).randn(16, 8).astype(np.float32)
  got = cr.coding_rate(jnp.asarray(z, jnp.bfloat16), 0.05)
  assert got.dtype == jnp.float32
  ref = numpy_coding_rate(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float32), 0.05)
  np.testing.assert_allclose(got, ref, rtol=1e-3)


def test_coding_rate_sharded_equals_global():
  devices = np.asarray(jax.devices()[:8])
  mesh = Mesh(devices, ("data",))
  z = np.random.RandomState(1).randn(64, 16).astype(np.float32)
  z_sharded = jax.device_put(z, NamedSharding(mesh, P("data")))
  got = jax.jit(lambda x: cr.coding_rate(x, 0.05))(z_sharded)
  np.testing.assert_allclose(got, numpy_coding_rate(z, 0.05), rtol=1e-5)


def test_agreement_equals_numpy_bce():
  rng = np.random.RandomState(2)
  student = rng.randn(4, 8, 16).astype(np.float32)  # 2 global + 2 local views
  teacher = rng.randn(2, 8, 16).astype(np.float32)
  msgs = (teacher > 0).astype(np.float32)
  bce, acc = bits.agreement(jnp.asarray(student), jnp.asarray(msgs))
  pairs = [(g, v) for g in range(2) for v in range(4) if v != g]
  assert len(pairs) == 6
  ref = np.mean([numpy_bce(student[v], msgs[g]) for g, v in pairs])
  ref_acc = np.mean([np.mean((student[v] > 0) == msgs[g]) for g, v in pairs])
  np.testing.assert_allclose(bce, ref, rtol=1e-5)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)


def test_total_loss_formula():
  rng = np.random.RandomState(3)
  student = rng.randn(3, 16, 8).astype(np.float32)
  teacher = rng.randn(2, 16, 8).astype(np.float32)
  config = _config(coding_rate_weight=0.3, bce_weight=2.0)
  loss, (_, metrics) = bits.loss(
      jnp.asarray(student), jnp.asarray(teacher), {}, step=0, config=config
  )
  msgs = (teacher > 0).astype(np.float32)
  pairs = [(g, v) for g in range(2) for v in range(3) if v != g]
  bce = np.mean([numpy_bce(student[v], msgs[g]) for g, v in pairs])
  rate = np.mean([numpy_coding_rate(student[g], 0.05) for g in range(2)])
  n, d = 16, 8
  expected = 2.0 * bce - 0.3 * (d + n) / (d * n) * rate
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["bit_balance"], msgs.mean(), rtol=1e-6)


def test_gradients_finite_and_none_reach_teacher():
  rng = np.random.RandomState(4)
  student = jnp.asarray(rng.randn(4, 8, 16).astype(np.float32))
  teacher = jnp.asarray(rng.randn(2, 8, 16).astype(np.float32))
  f = lambda s, t: bits.loss(s, t, {}, step=0, config=_config())[0]
  g_student, g_teacher = jax.grad(f, argnums=(0, 1))(student, teacher)
  assert np.all(np.isfinite(g_student)) and np.abs(g_student).sum() > 0
  np.testing.assert_array_equal(g_teacher, 0.0)
  g_msgs = jax.grad(lambda t: jnp.sum(bits.messages(t)))(teacher)
  np.testing.assert_array_equal(g_msgs, 0.0)


def test_bit_statistics():
  msgs = jnp.asarray(np.array([[[1, 0], [1, 1], [1, 0], [1, 1]]], np.float32))  # [1, 4, 2]
  balance, entropy = bits.bit_statistics(msgs)
  np.testing.assert_allclose(balance, 0.75)
  # bit 0 always on (0 bits), bit 1 on half the time (1 bit).
  np.testing.assert_allclose(entropy, 0.5, rtol=1e-5)


def test_single_view_is_rejected():
  with pytest.raises(ValueError, match="at least two views"):
    bits.agreement(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)))


def test_unknown_method():
  with pytest.raises(ValueError, match="config.objective.name"):
    objectives.get("bitz")
