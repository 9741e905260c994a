"""Tests for bits_jax.evaluate.linear."""

import numpy as np
import pytest

from bits_jax.evaluate import linear


def _separable(rng, n, num_classes=6, d=12, scale=1.0, offset=0.0):
  """Class = argmax of a fixed linear map: linearly separable by design."""
  w = rng.normal(size=(d, num_classes))
  x = rng.normal(size=(4 * n, d))
  logits = x @ w
  top2 = np.sort(logits, axis=1)[:, -2:]
  x = x[top2[:, 1] - top2[:, 0] > 0.5][:n]  # Keep a margin.
  y = np.argmax(x @ w, axis=1)
  return (x * scale + offset).astype(np.float32), y


def test_separable_features_reach_near_perfect_accuracy():
  rng = np.random.default_rng(0)
  x, y = _separable(rng, 900)
  got = linear.linear_probe(
      x[:600],
      y[:600],
      x[600:],
      y[600:],
      num_classes=6,
      learning_rates=(0.01, 0.1, 1.0),
      epochs=30,
      batch_size=64,
  )
  assert got["linear_top1"] >= 0.97
  assert got["linear_top5"] == 1.0
  assert got["linear_best_lr"] in (0.01, 0.1, 1.0)
  assert got["linear_val_top1"] == max(got[f"linear_val_top1_lr{lr:g}"] for lr in (0.01, 0.1, 1.0))


def test_random_labels_stay_near_chance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(700, 12)).astype(np.float32)
  y = rng.integers(0, 6, size=700)
  got = linear.linear_probe(
      x[:500],
      y[:500],
      x[500:],
      y[500:],
      num_classes=6,
      learning_rates=(0.1,),
      epochs=10,
      batch_size=64,
  )
  assert got["linear_top1"] < 0.35  # Chance is 1/6.


def test_standardization_handles_badly_scaled_features():
  rng = np.random.default_rng(2)
  x, y = _separable(rng, 700, num_classes=4, scale=1e3, offset=5e3)
  kwargs = dict(num_classes=4, learning_rates=(0.1,), epochs=20, batch_size=64, val_fraction=0.0)
  good = linear.linear_probe(x[:500], y[:500], x[500:], y[500:], standardize=True, **kwargs)
  assert good["linear_top1"] >= 0.95
  assert "linear_top5" not in good  # Fewer than 5 classes.
  raw = linear.linear_probe(x[:500], y[:500], x[500:], y[500:], standardize=False, **kwargs)
  assert raw["linear_top1"] < good["linear_top1"]


def test_adamw_masks_and_no_retrain():
  rng = np.random.default_rng(3)
  x, y = _separable(rng, 600, num_classes=5)
  # Masked-out training rows carry wrong labels; they must be ignored.
  y_noisy = y.copy()
  y_noisy[:200] = (y[:200] + 1) % 5
  train_mask = np.arange(400) >= 200
  test_mask = np.ones(200, bool)
  kwargs = dict(
      num_classes=5,
      optimizer="adamw",
      learning_rates=(0.03, 0.1, 0.3),
      epochs=40,
      batch_size=32,
      retrain_on_full=False,
  )
  got = linear.linear_probe(
      x[:400], y_noisy[:400], x[400:], y[400:], train_mask=train_mask, test_mask=test_mask, **kwargs
  )
  assert got["linear_top1"] >= 0.9
  unmasked = linear.linear_probe(x[:400], y_noisy[:400], x[400:], y[400:], **kwargs)
  assert unmasked["linear_top1"] < 0.7


def test_bad_inputs_raise_clear_errors():
  x = np.ones((10, 3), np.float32)
  y = np.zeros(10, np.int32)
  with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
    linear.linear_probe(
        x,
        y,
        x,
        y,
        num_classes=2,
        optimizer="lbfgs",
        learning_rates=(0.1,),
        val_fraction=0.0,
        epochs=1,
    )
  with pytest.raises(ValueError, match="val_fraction > 0"):
    linear.linear_probe(x, y, x, y, num_classes=2, val_fraction=0.0)
  with pytest.raises(ValueError, match="check num_classes"):
    linear.linear_probe(x, y + 2, x, y, num_classes=2)
  bad = x.copy()
  bad[4, 1] = np.nan
  with pytest.raises(ValueError, match="train_feats row 4 has non-finite"):
    linear.linear_probe(bad, y, x, y, num_classes=2, learning_rates=(0.1,), val_fraction=0.0)
  with pytest.raises(ValueError, match="test_feats row 4 has non-finite"):
    linear.linear_probe(x, y, bad, y, num_classes=2, learning_rates=(0.1,), val_fraction=0.0)
  keep = np.arange(10) != 4  # A masked (padding) row may hold anything.
  linear.linear_probe(
      bad,
      y,
      bad,
      y,
      num_classes=2,
      learning_rates=(0.1,),
      val_fraction=0.0,
      epochs=1,
      train_mask=keep,
      test_mask=keep,
  )
