"""Coding rate (log-det) of a batch of vectors, the channel-usage regularizer.

R(z) = 0.5 * logdet(I_d + d / (n * eps) * Zn^T Zn), with Zn the rows of z L2-normalized
(SimDINO's convention, `coding_rate`). `rate_of_unit_rows` also offers the paper's Eq. 9,
0.5 * logdet(I_d + d / eps^2 * Cov(Zn)), and per-device Gram matrices.

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

from bits_jax import utils

_JITTER = 1e-6
RATE_VIEWS = ("student", "student_teacher")
RATE_SCOPES = ("global", "device")


def _cholesky_with_retry(matrix: jax.Array) -> jax.Array:
  """Lower Cholesky factor of `matrix: [k, k]`, factored once; refactored with a jitter
  only in the rare case where the first factor is not finite."""
  k = matrix.shape[-1]
  relative = max(k * float(jnp.finfo(matrix.dtype).eps), 1e-5)
  chol = jnp.linalg.cholesky(matrix)
  return jax.lax.cond(
      jnp.all(jnp.isfinite(chol)),
      lambda m, c: c,
      lambda m, c: jnp.linalg.cholesky(
          m + relative * jnp.max(jnp.diagonal(m)) * jnp.eye(k, dtype=m.dtype)
      ),
      matrix,
      chol,
  )


@jax.custom_jvp
def _logdet_symmetric(matrix: jax.Array) -> jax.Array:
  return 2.0 * jnp.sum(jnp.log(jnp.diagonal(_cholesky_with_retry(matrix))))


@_logdet_symmetric.defjvp
def _logdet_symmetric_jvp(primals, tangents):
  # d logdet(A) = <A^-1, dA>, with A^-1 from the factor the value used: differentiating
  # through the Cholesky instead would pull the failed factor's NaN into the gradient.
  (matrix,), (dmatrix,) = primals, tangents
  chol = _cholesky_with_retry(matrix)
  inverse = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(matrix.shape[-1], dtype=matrix.dtype))
  value = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
  return value, jnp.sum(inverse * dmatrix)


def logdet_spd(matrix: jax.Array) -> jax.Array:
  """log|A| for a symmetric positive definite `matrix: [k, k]` via one Cholesky.

  When rounding makes the factorization fail (a huge d / (n eps) times a near-singular
  Gram, e.g. duplicate rows with a tiny eps), it is redone with a jitter of
  max(k * float32 eps, 1e-5) times the largest diagonal entry, larger than the rounding
  error of the matrix: a finite, slightly high value and a finite gradient (the inverse of
  the jittered matrix; the jitter counts as a constant) instead of a NaN. A non-finite
  `matrix` stays non-finite (the train step's guard skips that update).
  """
  k = matrix.shape[-1]
  eye = jnp.eye(k, dtype=matrix.dtype)
  return _logdet_symmetric(0.5 * (matrix + matrix.T) + _JITTER * eye)


CONVENTIONS = ("simdino", "paper")


def _half_logdet_gram(x: jax.Array, scale) -> jax.Array:
  """0.5 * logdet(I_d + scale * X^T X) for `x: [m, d]`, factoring the smaller Gram matrix."""
  m, d = x.shape
  hi = jax.lax.Precision.HIGHEST
  if d <= m:
    gram = jnp.matmul(x.T, x, precision=hi)  # [d, d]
  else:
    gram = jnp.matmul(x, x.T, precision=hi)  # [m, m]
  eye = jnp.eye(gram.shape[0], dtype=jnp.float32)
  return 0.5 * logdet_spd(eye + scale * gram)


def rate_of_unit_rows(
    zn: jax.Array, eps: float, *, convention: str = "simdino", num_shards: int = 1
) -> jax.Array:
  """Coding rate of `zn: [n, d]` (rows already L2-normalized, or means of such rows).

  convention 'simdino': 0.5 logdet(I + d / (n eps) Zk^T Zk), n the whole batch;
  'paper' (Eq. 9): 0.5 logdet(I + d / eps^2 Cov(Zk)), Cov the centered covariance (1 / m).
  `num_shards > 1` splits the rows into that many contiguous blocks Zk of m = n / num_shards
  rows (one per device when the batch is split over the devices) and averages their rates:
  SimDINO's per-GPU Gram matrices, which keep the global n in d / (n eps). One block: Zk = Zn.
  Returns a float32 scalar.
  """
  if zn.ndim != 2:
    raise ValueError(f"coding rate expects z of shape [n, d], got {zn.shape}.")
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown coding-rate convention {convention!r}: use one of {CONVENTIONS}.")
  n, d = zn.shape
  if n % num_shards:
    raise ValueError(
        f"a batch of {n} rows does not split into {num_shards} per-device blocks: use a batch "
        "divisible by the number of devices, or config.objective.bits.rate_scope='global'."
    )
  m = n // num_shards
  blocks = zn.astype(jnp.float32).reshape(num_shards, m, d)
  if convention == "paper":
    blocks = blocks - jnp.mean(blocks, axis=1, keepdims=True)
    scale = d / (eps**2 * m)
  else:
    scale = d / (n * eps)
  if num_shards == 1:
    return _half_logdet_gram(blocks[0], scale)
  return jnp.mean(jax.vmap(lambda x: _half_logdet_gram(x, scale))(blocks))


def coding_rate(z: jax.Array, eps: float = 0.05) -> jax.Array:
  """0.5 * logdet(I_d + d / (n * eps) * Zn^T Zn) for `z: [n, d]`; float32 scalar."""
  if z.ndim != 2:
    raise ValueError(f"coding_rate expects z of shape [n, d], got {z.shape}.")
  return rate_of_unit_rows(utils.l2_normalize(z.astype(jnp.float32)), eps)


def global_view_rate(
    student_out: jax.Array,
    teacher_out: jax.Array,
    eps: float,
    *,
    views: str = "student",
    scope: str = "global",
    convention: str = "simdino",
    batch_shards: int = 1,
) -> jax.Array:
  """Mean coding rate over the G global views of L2-normalised head outputs (BITS, SimDINO).

  `student_out: [V, n, d]` (the first G views global), `teacher_out: [G, n, d]`.
  views 'student': the student's global views; 'student_teacher': (z_s + z_t) / 2 per global
  view, the teacher's without gradient (SimDINO's expa_type=1). scope 'global': one Gram
  matrix over the batch; 'device': one per device (`batch_shards` contiguous blocks),
  averaged (SimDINO's default, reduce_cov=0). `convention`: see `rate_of_unit_rows`.
  """
  if views not in RATE_VIEWS or scope not in RATE_SCOPES:
    raise ValueError(
        f"coding-rate views={views!r} / scope={scope!r}: use {RATE_VIEWS} / {RATE_SCOPES}."
    )
  num_global = teacher_out.shape[0]
  z = utils.l2_normalize(student_out[:num_global].astype(jnp.float32))
  if views == "student_teacher":
    zt = utils.l2_normalize(jax.lax.stop_gradient(teacher_out).astype(jnp.float32))
    z = 0.5 * (z + zt)
  shards = batch_shards if scope == "device" else 1
  rates = [
      rate_of_unit_rows(z[g], eps, convention=convention, num_shards=shards)
      for g in range(num_global)
  ]
  return jnp.mean(jnp.stack(rates))
