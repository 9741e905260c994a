"""Property-based tests (hypothesis) of the BITS loss and the coding rate.

Shapes are fixed per test so every function compiles once; hypothesis draws the values.
Range: loss and gradients are finite for logits up to 1e30 in magnitude, where a mean of
BCE terms over a batch still fits float32 (|x| * elements < 3.4e38); beyond, only the
element-wise BCE is (the train step's guard skips an update with a non-finite loss).
"""

import functools

from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bits_jax.objectives import bits
from bits_jax.objectives import coding_rate as coding_rate_lib
import helpers

V, G, B, D = 3, 2, 4, 8  # views, global views, batch, bits
_SETTINGS = settings(max_examples=60, deadline=None, database=None)


def _floats(bound):
  bound = float(np.float32(bound))
  return st.floats(
      -bound, bound, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False
  )  # TF sets flush-to-zero in this process


def _logits(shape, bound):
  return hnp.arrays(np.float32, shape, elements=_floats(bound))


def _config():
  config = helpers.load_config("fashion_mnist", "test")
  config.objective.bits.num_bits = D
  return config


@functools.partial(jax.jit, static_argnums=2)
def _loss_and_grad(student, teacher, settings_items):
  # The settings travel as a hashable tuple (a static argument); the loss reads
  # config.objective.bits.
  config = ml_collections.ConfigDict(dict(objective=dict(bits=dict(settings_items))))

  def loss(s):
    return bits.loss(s, teacher, {}, step=0, config=config)[0]

  return jax.value_and_grad(loss)(student)


def _items(config):
  settings = config.objective.bits
  return tuple(settings.items())


@_SETTINGS
@given(student=_logits((V, B, D), 1e30), teacher=_logits((G, B, D), 1e30))
def test_loss_is_finite_for_finite_logits(student, teacher):
  loss, _ = _loss_and_grad(student, teacher, _items(_config()))
  assert np.isfinite(loss), (student, teacher)


@_SETTINGS
@given(student=_logits((V, B, D), 1e30), teacher=_logits((G, B, D), 1e30))
def test_gradients_are_finite_for_finite_logits(student, teacher):
  loss, grad = _loss_and_grad(student, teacher, _items(_config()))
  assert np.isfinite(loss) and np.all(np.isfinite(grad)), (student, teacher)


@_SETTINGS
@given(logit=_floats(np.finfo(np.float32).max), label=st.sampled_from([0.0, 1.0]))
def test_elementwise_bce_is_finite_over_the_whole_float32_range(logit, label):
  s = jnp.full((2, 1, 1), logit, jnp.float32)
  m = jnp.full((1, 1, 1), label, jnp.float32)
  bce, _ = bits.agreement(s, m)
  assert np.isfinite(bce) and bce >= 0


_rate = jax.jit(coding_rate_lib.coding_rate, static_argnums=1)


@_SETTINGS
@given(
    z=st.one_of(_logits((6, 4), 1e6), _logits((3, 8), 1e6)),
    eps=st.sampled_from([0.5, 0.05, 1e-3, 1e-9]),
)
def test_coding_rate_is_finite_and_non_negative(z, eps):
  rate = _rate(z, eps)
  assert np.isfinite(rate) and rate >= 0.0, (z, eps, rate)


def _rows_with_norm(shape):
  return _logits(shape, 1e4).filter(lambda z: np.all(np.linalg.norm(z, axis=1) > 1e-2))


def _row_scales(n):
  magnitude = st.floats(float(np.float32(1e-3)), 1e3, width=32)
  return st.lists(st.tuples(magnitude, st.sampled_from([-1.0, 1.0])), min_size=n, max_size=n)


@_SETTINGS
@given(data=st.data(), shape=st.sampled_from([(6, 4), (3, 8)]))
def test_coding_rate_is_invariant_to_row_scaling(data, shape):
  z = data.draw(_rows_with_norm(shape))
  scales = np.asarray([m * s for m, s in data.draw(_row_scales(shape[0]))], np.float32)
  np.testing.assert_allclose(_rate(z * scales[:, None], 0.05), _rate(z, 0.05), rtol=1e-4, atol=1e-5)


_agreement = jax.jit(bits.agreement)


@_SETTINGS
@given(
    student=_logits((V, B, D), 50.0),
    message=hnp.arrays(np.float32, (B, D), elements=st.sampled_from([0.0, 1.0])),
)
def test_bce_is_lowest_when_student_logits_agree_with_the_messages(student, message):
  """With one message for all teacher views: flipping every logit to the message's sign
  never raises the BCE (and lowers it if any sign disagreed); agreeing logits of growing
  magnitude lower it towards 0, with bit accuracy 1."""
  messages = np.broadcast_to(message, (G, B, D))
  signs = 2.0 * message - 1.0
  agreeing = np.abs(student) * signs
  bce, _ = _agreement(student, messages)
  bce_agreeing, accuracy = _agreement(agreeing, messages)
  assert bce_agreeing <= bce + 1e-6
  if np.any((student * signs < 0) & (np.abs(student) > 1e-3)):
    assert bce_agreeing < bce
  confident = [
      float(_agreement(jnp.broadcast_to(c * signs, (V, B, D)), messages)[0])
      for c in (0.5, 2.0, 8.0)
  ]
  assert confident[0] > confident[1] > confident[2] >= 0.0
  assert float(_agreement(jnp.broadcast_to(8.0 * signs, (V, B, D)), messages)[1]) == 1.0
  if np.all(np.abs(student) > 1e-3):
    assert float(accuracy) == 1.0


def test_coding_rate_cholesky_failure_is_handled_by_jitter():
  """Duplicate rows with a tiny eps: I + d/(n eps) Z Z^T is singular in float32 and the
  plain Cholesky fails (NaN); the jittered retry gives a finite value and finite grads."""
  z = jnp.ones((4, 8), jnp.float32)
  plain = jnp.linalg.cholesky(
      jnp.eye(4) + 8 / (4 * 1e-12) * (z / jnp.sqrt(8.0)) @ (z / jnp.sqrt(8.0)).T
  )
  assert not np.all(np.isfinite(plain))
  rate, grad = jax.value_and_grad(lambda x: coding_rate_lib.coding_rate(x, 1e-12))(
      z + 1e-3 * jnp.arange(8.0)
  )
  assert np.isfinite(rate) and rate > 0 and np.all(np.isfinite(grad))
  assert np.isnan(coding_rate_lib.coding_rate(jnp.full((4, 8), jnp.nan)))
