"""Coding rate (log-det) of a batch of vectors, the channel-usage regularizer.

R(z) = 0.5 * logdet(I_d + d / (n * eps) * Zn^T Zn), with Zn the rows of z L2-normalized.

By Sylvester's determinant identity logdet(I_d + a Z^T Z) = logdet(I_n + a Z Z^T), so we
factor whichever Gram matrix is smaller. The matrix is symmetric positive definite with all
eigenvalues >= 1, so a Cholesky factorization is well conditioned; a small diagonal jitter
guards against rounding in very large batches, and a non-finite input yields a non-finite
value (caught by the train step's numerical guard) rather than silently wrong params.

Global batch: call this on the whole (global) array inside `jax.jit`. When `z` is sharded over
a mesh, XLA reduces the Gram matrix across devices, so the value equals the one computed on
the full batch on one device; there is no per-device approximation.
"""
import jax
import jax.numpy as jnp

_JITTER = 1e-6


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def logdet_spd(matrix: jax.Array) -> jax.Array:
  """log|A| for a symmetric positive definite `matrix: [k, k]` via Cholesky.

  When rounding makes the factorization fail (a huge d / (n eps) times a near-singular
  Gram, e.g. duplicate rows with a tiny eps), it is redone with a jitter of
  max(k * float32 eps, 1e-5) times the largest diagonal entry, larger than the rounding
  error of the matrix: a finite, slightly high value instead of a NaN. A non-finite
  `matrix` stays non-finite (the train step's guard skips that update).
  """
  k = matrix.shape[-1]
  eye = jnp.eye(k, dtype=matrix.dtype)
  matrix = 0.5 * (matrix + matrix.T) + _JITTER * eye
  relative = max(k * float(jnp.finfo(matrix.dtype).eps), 1e-5)
  # The branch is chosen on a gradient-free factorization, so the failed one (NaN) never
  # enters the backward pass.
  factorizes = jnp.all(jnp.isfinite(jnp.linalg.cholesky(jax.lax.stop_gradient(matrix))))
  chol = jax.lax.cond(
      factorizes, jnp.linalg.cholesky,
      lambda m: jnp.linalg.cholesky(m + relative * jnp.max(jnp.diagonal(m)) * eye), matrix)
  return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))


def coding_rate(z: jax.Array, eps: float = 0.05) -> jax.Array:
  """0.5 * logdet(I_d + d / (n * eps) * Zn^T Zn) for `z: [n, d]`; float32 scalar."""
  if z.ndim != 2:
    raise ValueError(f"coding_rate expects z of shape [n, d], got {z.shape}.")
  n, d = z.shape
  zn = l2_normalize(z.astype(jnp.float32))
  scale = d / (n * eps)
  hi = jax.lax.Precision.HIGHEST
  if d <= n:
    gram = jnp.matmul(zn.T, zn, precision=hi)  # [d, d]
    eye = jnp.eye(d, dtype=jnp.float32)
  else:
    gram = jnp.matmul(zn, zn.T, precision=hi)  # [n, n]
    eye = jnp.eye(n, dtype=jnp.float32)
  return 0.5 * logdet_spd(eye + scale * gram)
