"""GELU: the erf form against a float64 reference, its gradient, and the tanh option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from bits_jax.models import activations


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 GELU(x) = x Phi(x) and its derivative Phi(x) + x phi(x)."""
  x = x.astype(np.float64)
  cdf = scipy.special.ndtr(x)
  return x * cdf, cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def test_exact_gelu_and_its_gradient_match_a_float64_reference():
  x = np.linspace(-12.0, 12.0, 20001, dtype=np.float32)
  value, grad = jax.vmap(jax.value_and_grad(activations.gelu))(jnp.asarray(x))
  ref_value, ref_grad = _reference(x)
  # float32: relative rounding on the positive side, a small absolute error in the tail.
  np.testing.assert_allclose(np.asarray(value), ref_value, rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-6, atol=2e-6)
  assert np.all(np.asarray(value)[x < -6] <= 0) and np.all(np.asarray(value)[x < -6] > -1e-5)


def test_exact_gelu_is_the_function_jax_computes_through_erfc():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 32)) * 3
  np.testing.assert_allclose(
      activations.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=2e-6
  )


def test_approximate_is_jax_tanh_gelu():
  x = jax.random.normal(jax.random.PRNGKey(1), (16,)) * 3
  np.testing.assert_array_equal(
      activations.gelu(x, approximate=True), jax.nn.gelu(x, approximate=True)
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_is_kept(dtype):
  x = jnp.linspace(-3, 3, 7).astype(dtype)
  out = activations.gelu(x)
  assert out.dtype == dtype
  np.testing.assert_allclose(
      np.asarray(out, np.float32), _reference(np.asarray(x, np.float32))[0], atol=2e-2
  )
