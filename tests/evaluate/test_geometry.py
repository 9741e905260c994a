"""Tests for bits_jax.evaluate.geometry on features with a known covariance spectrum."""

import os
import types

import numpy as np
import pytest

from bits_jax.evaluate import geometry


def _features(eigenvalues, n=300, seed=0):
  """Features [n, D] whose (1/n, centred) covariance has exactly `eigenvalues`."""
  rng = np.random.default_rng(seed)
  d = len(eigenvalues)
  z = rng.normal(size=(n, d))
  q, _ = np.linalg.qr(z - z.mean(0))  # Orthonormal columns, orthogonal to the ones vector.
  rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
  x = np.sqrt(n) * q * np.sqrt(eigenvalues) @ rotation
  return x + rng.normal(size=d) * 5  # A mean offset: must be centred away.


def test_known_spectrum():
  lam = np.array([4.0, 4.0, 1.0, 1.0, 0.0, 0.0])
  feats = _features(lam)
  np.testing.assert_allclose(geometry.covariance_eigenvalues(feats), lam, atol=1e-9)
  got, _ = geometry.geometry_metrics(feats, thresholds=(0.8, 0.9), dims=(1, 4, 10))
  p = np.array([0.4, 0.4, 0.1, 0.1])
  assert got["d_eff"] == pytest.approx(100 / 34)
  assert got["r_eff"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  assert got["explained@1"] == pytest.approx(0.4) and got["explained@4"] == pytest.approx(1)
  assert "explained@10" not in got
  assert got["dims_for_80pct"] == 2 and got["dims_for_90pct"] == 3


def test_equal_eigenvalues_give_their_count_and_mask_drops_rows():
  feats = _features(np.array([2.0] * 5 + [0.0] * 3), n=100, seed=1).astype(np.float32)
  padded = np.concatenate([feats, np.full((7, 8), 1e3, np.float32)])
  mask = np.arange(107) < 100
  got, _ = geometry.geometry_metrics(padded, mask)
  assert got["d_eff"] == pytest.approx(5, rel=1e-5)
  assert got["r_eff"] == pytest.approx(5, rel=1e-4)
  assert got["num_rows"] == 100
  assert geometry.effective_dimensions(np.zeros(3)) == {"d_eff": 0.0, "r_eff": 0.0}
  with pytest.raises(ValueError, match="non-finite"):
    geometry.covariance_eigenvalues(np.full((3, 2), np.nan))


def test_run_writes_plot_and_values(tmp_path):
  feats = _features(np.array([3.0, 1.0, 0.0]), n=50).astype(np.float32)
  plots = []
  ctx = types.SimpleNamespace(
      features=lambda split: {"cls": feats, "label": np.zeros(50, int), "mask": np.ones(50, bool)},
      out_dir=str(tmp_path),
      add_plot=plots.append,
      mesh=None,
      step=0,
      num_classes=1,
  )
  got = geometry.run(ctx)
  assert got["d_eff"] == pytest.approx(16 / 10, rel=1e-5)
  assert [os.path.basename(p) for p in plots] == ["explained_variance.png"]
  table = np.loadtxt(tmp_path / "eigenvalues.csv", delimiter=",", skiprows=1)
  np.testing.assert_allclose(table[:, 2], [0.75, 1.0, 1.0], atol=1e-6)
  ctx.out_dir = None
  assert geometry.run(ctx) == pytest.approx(got)
