"""Every `config.objective.bits` option against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bits_jax import config_defaults
from bits_jax import sharding as sharding_lib
from bits_jax import train_step
from bits_jax.objectives import bits
from bits_jax.objectives import common

V, G, N, D = 3, 2, 32, 8  # views, global views, batch, bits


def _config(**overrides):
  settings = config_defaults.objective_defaults().bits
  settings.update(overrides)
  return ml_collections.ConfigDict(dict(objective=dict(bits=settings)))


def _logits(seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(V, N, D).astype(np.float32), rng.randn(G, N, D).astype(np.float32)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_rate(z, eps, convention="simdino", shards=1):
  """Mean over `shards` contiguous blocks of 0.5 logdet(I + M), rows of z already unit."""
  n, d = z.shape
  rates = []
  for block in np.split(np.asarray(z, np.float64), shards):
    m = block.shape[0]
    if convention == "paper":
      c = block - block.mean(axis=0)
      matrix = d / eps**2 * (c.T @ c) / m  # d / eps^2 Cov(Z)
    else:
      matrix = d / (n * eps) * block.T @ block  # SimDINO: global n, per-block Gram
    rates.append(0.5 * np.linalg.slogdet(np.eye(d) + matrix)[1])
  return np.mean(rates)


def np_bce(s, t, reduction):
  s = np.asarray(s, np.float64)
  log_p, log_q = -np.logaddexp(0, -s), -np.logaddexp(0, s)
  per_bit = -(t * log_p + (1 - t) * log_q)
  return np.mean(per_bit.sum(-1) if reduction == "sum" else per_bit.mean(-1))


def np_loss(student, teacher, settings, shards=1):
  """The BITS loss in float64 from the settings (see bits.py's docstring)."""
  s = settings
  pairs = [(g, v) for g in range(G) for v in range(V) if v != g]
  t = teacher.astype(np.float64)
  targets = 1.0 / (1.0 + np.exp(-t / s.target_temperature)) if s.target_temperature else t > 0
  targets = targets.astype(np.float64)
  if s.agreement == "cosine":
    agree = np.mean(
        [np.mean(1 - np.sum(_unit(student[v]) * _unit(2 * targets[g] - 1), -1)) for g, v in pairs]
    )
  else:
    agree = np.mean([np_bce(student[v], targets[g], s.bce_reduction) for g, v in pairs])
  z = _unit(student[:G])
  if s.rate_views == "student_teacher":
    z = 0.5 * (z + _unit(teacher))
  rate = np.mean([np_rate(z[g], s.eps, s.rate_eps_convention, shards) for g in range(G)])
  balance = (D + N) / (D * N) if s.rate_balance else 1.0
  return s.bce_weight * agree - s.coding_rate_weight * balance * rate, agree, rate


_OPTIONS = {
    "defaults": {},
    "bce sum": {"bce_reduction": "sum"},
    "cosine": {"agreement": "cosine"},
    "soft targets": {"target_temperature": 0.1},
    "soft targets cosine": {"target_temperature": 0.5, "agreement": "cosine"},
    "student+teacher rate": {"rate_views": "student_teacher"},
    "paper eps": {"rate_eps_convention": "paper", "eps": 0.5},
    "no balance": {"rate_balance": False},
    "weights": {"bce_weight": 2.0, "coding_rate_weight": 0.3},
}


@pytest.mark.parametrize("name", sorted(_OPTIONS))
def test_loss_matches_numpy(name):
  config = _config(**_OPTIONS[name])
  student, teacher = _logits(1)
  loss, (_, metrics) = bits.loss(
      jnp.asarray(student), jnp.asarray(teacher), {}, step=0, config=config
  )
  expected, agree, rate = np_loss(student, teacher, config.objective.bits)
  np.testing.assert_allclose(metrics["agreement_loss"], agree, rtol=1e-5)
  np.testing.assert_allclose(metrics["coding_rate"], rate, rtol=1e-4)
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
  terms = metrics[common.LOSS_TERMS]
  np.testing.assert_allclose(terms["agreement"] + terms["coding_rate"], loss, rtol=1e-6)
  # agreement_bce stays the mean BCE against the hard messages, whatever the options.
  msgs = (teacher > 0).astype(np.float64)
  pairs = [(g, v) for g in range(G) for v in range(V) if v != g]
  bce = np.mean([np_bce(student[v], msgs[g], "mean") for g, v in pairs])
  np.testing.assert_allclose(metrics["agreement_bce"], bce, rtol=1e-5)


def test_sum_is_num_bits_times_mean():
  student, teacher = _logits(2)
  msgs = bits.messages(jnp.asarray(teacher))
  mean, _ = bits.agreement(jnp.asarray(student), msgs, reduction="mean")
  total, _ = bits.agreement(jnp.asarray(student), msgs, reduction="sum")
  np.testing.assert_allclose(total, D * mean, rtol=1e-5)


def test_cosine_of_perfect_signs_is_zero():
  _, teacher = _logits(3)
  msgs = bits.messages(jnp.asarray(teacher))
  exact = jnp.where(msgs > 0, 1.0, -1.0)
  student = jnp.stack([exact[1], exact[0], exact[0]])  # pairs (0,1), (0,2), (1,0), (1,2)
  loss, _ = bits.agreement(student, msgs, kind="cosine")
  expected = np.mean([0.0, 0.0, 0.0, 1 - np.mean(np.sum(_unit(exact[0]) * _unit(exact[1]), -1))])
  np.testing.assert_allclose(loss, expected, atol=1e-6)


def test_soft_targets_get_no_gradient_and_approach_messages():
  _, teacher = _logits(4)
  t = jnp.asarray(teacher)
  np.testing.assert_array_equal(jax.grad(lambda x: bits.targets(x, 0.1).sum())(t), 0.0)
  np.testing.assert_allclose(bits.targets(t, 1e-4), bits.messages(t), atol=1e-6)


def test_teacher_half_of_the_rate_gets_no_gradient():
  student, teacher = _logits(5)
  config = _config(rate_views="student_teacher")
  f = lambda s, t: bits.loss(s, t, {}, step=0, config=config)[0]
  g_student, g_teacher = jax.grad(f, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_array_equal(g_teacher, 0.0)
  assert np.abs(np.asarray(g_student[:G])).sum() > 0


@pytest.mark.parametrize("convention", ["simdino", "paper"])
def test_device_scope_is_mean_of_per_shard_rates_on_8_devices(convention):
  devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, sharding_lib.MESH_AXES)
  assert train_step.num_batch_shards(mesh) == 8
  student, teacher = _logits(6)
  config = _config(rate_scope="device", rate_eps_convention=convention, eps=0.5)
  spec = NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES))
  put = lambda x: jax.device_put(x, spec)

  @jax.jit
  def f(s, t):
    return bits.loss(s, t, {}, step=0, config=config, batch_shards=8)

  loss, (_, metrics) = f(put(student), put(teacher))
  expected, _, rate = np_loss(student, teacher, config.objective.bits, shards=8)
  np.testing.assert_allclose(metrics["coding_rate"], rate, rtol=1e-4)
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
  # Per-device differs from the global batch's rate (the option changes something).
  assert abs(rate - np_loss(student, teacher, config.objective.bits, shards=1)[2]) > 1e-3
  # Global scope ignores batch_shards.
  config.objective.bits.rate_scope = "global"
  _, (_, m) = bits.loss(
      jnp.asarray(student), jnp.asarray(teacher), {}, step=0, config=config, batch_shards=8
  )
  np.testing.assert_allclose(
      m["coding_rate"], np_loss(student, teacher, config.objective.bits)[2], rtol=1e-4
  )


def test_device_scope_needs_divisible_batch():
  student, teacher = _logits(7)
  with pytest.raises(ValueError, match="does not split into 5 per-device blocks"):
    bits.loss(
        jnp.asarray(student),
        jnp.asarray(teacher),
        {},
        step=0,
        config=_config(rate_scope="device"),
        batch_shards=5,
    )


def test_bad_choices_are_reported():
  problems = bits.config_problems(
      ml_collections.ConfigDict(
          dict(
              objective=dict(
                  bits=dict(
                      config_defaults.objective_defaults().bits,
                      agreement="l2",
                      rate_scope="host",
                      target_temperature=-1.0,
                  )
              )
          )
      )
  )
  assert any("config.objective.bits.agreement='l2': use one of" in p for p in problems)
  assert any("config.objective.bits.rate_scope='host'" in p for p in problems)
  assert any("target_temperature=-1.0 must be >= 0" in p for p in problems)
