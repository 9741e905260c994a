"""Representation geometry: the spectrum of the backbone-feature covariance (Tab. 2, Fig. 1).

With lambda_1 >= ... >= lambda_D >= 0 the eigenvalues of the covariance of features [n, D]
(centred; the 1/n normalisation cancels in everything below):
  d_eff = (sum lambda)^2 / sum lambda^2       (participation ratio)
  r_eff = exp(H(lambda / sum lambda))         (entropy in nats; Roy & Vetterli's effective rank)
  explained(k) = (lambda_1 + ... + lambda_k) / sum lambda
Both effective dimensions equal m for m equal eigenvalues and the rest zero. The covariance is
accumulated in float64 on the host in row blocks (no [n, D] float64 copy).
"""

import os
from typing import Any, Sequence

import numpy as np

from bits_jax.evaluate import common

_ROW_BLOCK = 65536


def covariance_eigenvalues(feats, mask=None) -> np.ndarray:
  """Eigenvalues [D] (descending, clipped at 0) of the covariance of `feats: [n, D]`."""
  feats = np.asarray(feats)
  if feats.ndim != 2:
    raise ValueError(f"features must be [n, D], got shape {feats.shape}.")
  if mask is not None:
    feats = feats[np.asarray(mask, bool)]
  n, d = feats.shape
  if n < 2:
    raise ValueError(f"need at least 2 (unmasked) feature rows, got {n}.")
  if not np.isfinite(feats).all():
    raise ValueError("features have non-finite values: the model produced NaN/inf.")
  mean = np.zeros(d)
  for start in range(0, n, _ROW_BLOCK):
    mean += feats[start : start + _ROW_BLOCK].sum(axis=0, dtype=np.float64)
  mean /= n
  cov = np.zeros((d, d))
  for start in range(0, n, _ROW_BLOCK):
    x = feats[start : start + _ROW_BLOCK].astype(np.float64) - mean
    cov += x.T @ x
  eig = np.linalg.eigvalsh(cov / n)[::-1]
  return np.maximum(eig, 0.0)


def effective_dimensions(eigenvalues) -> dict[str, float]:
  """{'d_eff', 'r_eff'} of a spectrum (see the module docstring); 0 for an all-zero one."""
  lam = np.asarray(eigenvalues, np.float64)
  total = lam.sum()
  if total <= 0:
    return {"d_eff": 0.0, "r_eff": 0.0}
  p = lam[lam > 0] / total
  return {"d_eff": float(total**2 / np.sum(lam**2)), "r_eff": float(np.exp(-np.sum(p * np.log(p))))}


def explained_variance(eigenvalues) -> np.ndarray:
  """Cumulative explained variance [D]: explained(k) for k = 1..D."""
  lam = np.asarray(eigenvalues, np.float64)
  total = lam.sum()
  return np.cumsum(lam) / total if total > 0 else np.zeros_like(lam)


def geometry_metrics(
    feats,
    mask=None,
    *,
    thresholds: Sequence[float] = (0.9, 0.95, 0.99),
    dims: Sequence[int] = (1, 10, 100),
) -> tuple[dict[str, float], np.ndarray]:
  """Scalars of the spectrum and the eigenvalues.

  Returns:
    ({'d_eff', 'r_eff', 'num_dims', 'num_rows', 'dims_for_{t}pct' (fewest directions that
      explain a fraction t), 'explained@{k}' (for k <= D)}, eigenvalues [D]).
  """
  eig = covariance_eigenvalues(feats, mask)
  curve = explained_variance(eig)
  n_rows = int(np.asarray(mask, bool).sum()) if mask is not None else len(feats)
  out = {**effective_dimensions(eig), "num_dims": float(len(eig)), "num_rows": float(n_rows)}
  for t in thresholds:
    # Fewest k with explained(k) >= t; tolerance for the float64 rounding of cumsum.
    out[f"dims_for_{100 * t:g}pct"] = float(np.argmax(curve >= t - 1e-12) + 1)
  for k in dims:
    if k <= len(eig):
      out[f"explained@{k}"] = float(curve[k - 1])
  return out, eig


@common.register("geometry")
def run(
    ctx,
    *,
    split: str = "test",
    features: str = "cls",
    thresholds: Sequence[float] = (0.9, 0.95, 0.99),
    dims: Sequence[int] = (1, 10, 100),
) -> dict[str, Any]:
  """d_eff, r_eff and the explained-variance curve of `features` on `split`.

  With ctx.out_dir: writes explained_variance.png (registered with ctx.add_plot) and
  eigenvalues.csv (eigenvalue and cumulative explained variance per direction).
  """
  feats = ctx.features(split)
  if features not in feats:
    raise ValueError(
        f"features {features!r} are not extracted: use one of "
        f"{sorted(k for k in feats if k not in ('label', 'mask', 'id'))}."
    )
  out, eig = geometry_metrics(feats[features], feats.get("mask"), thresholds=thresholds, dims=dims)
  if ctx.out_dir is not None:
    from bits_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

    os.makedirs(ctx.out_dir, exist_ok=True)
    curve = explained_variance(eig)
    np.savetxt(
        os.path.join(ctx.out_dir, "eigenvalues.csv"),
        np.stack([np.arange(1, len(eig) + 1), eig, curve], axis=1),
        delimiter=",",
        header="direction,eigenvalue,cumulative_explained",
        comments="",
        fmt=["%d", "%.9g", "%.9g"],
    )
    ctx.add_plot(
        plots.plot_explained_variance(
            curve, os.path.join(ctx.out_dir, "explained_variance.png"), thresholds
        )
    )
  return out
