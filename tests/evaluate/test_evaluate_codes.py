"""Tests for bits_jax.evaluate.codes on codes with known statistics."""

import numpy as np
import pytest

from bits_jax.evaluate import codes


def _logits(bits):
  """Logits whose sign gives bits: +1 for on, -1 for off."""
  return np.where(np.asarray(bits, bool), 1.0, -1.0)


def test_balance_entropy_and_mi_of_constructed_bits():
  labels = np.array([0, 1] * 8)  # Two balanced classes.
  parity = labels == 1  # MI = 1 bit, balance 1/2.
  constant = np.zeros(16, bool)  # Dead bit: MI = 0, entropy 0.
  # Balance 1/4, on for 2 of the 8 images of each class: independent of label.
  quarter = np.isin(np.arange(16), [0, 5, 8, 13])
  bits = np.stack([parity, constant, quarter], axis=1)
  out = codes.analyze_codes(_logits(bits), labels)
  np.testing.assert_allclose(out["bit_balance"], [0.5, 0.0, 0.25])
  h_quarter = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))  # 0.8113 bits
  np.testing.assert_allclose(out["bit_entropy"], [1.0, 0.0, h_quarter])
  np.testing.assert_allclose(out["bit_label_mi"], [1.0, 0.0, 0.0], atol=1e-12)
  assert out["label_entropy"] == pytest.approx(1.0)
  assert out["dead_bits_frac"] == pytest.approx(1 / 3)
  assert out["bit_label_mi_max"] == pytest.approx(1.0)


def test_correlation_of_copied_and_negated_bits():
  rng = np.random.default_rng(0)
  a = rng.random(200) > 0.5
  b = rng.random(200) > 0.5
  bits = np.stack([a, a, ~a, b, np.ones(200, bool)], axis=1)
  corr = codes.bit_correlation(bits)
  assert corr[0, 1] == pytest.approx(1.0)
  assert corr[0, 2] == pytest.approx(-1.0)
  assert abs(corr[0, 3]) < 0.2
  np.testing.assert_array_equal(corr[4, :4], 0.0)  # Constant bit.
  np.testing.assert_allclose(corr[:4, :4], np.corrcoef(bits[:, :4].T))
  out = codes.analyze_codes(_logits(bits), np.zeros(200, int))
  expected = np.abs(corr[~np.eye(5, dtype=bool)]).mean()
  assert out["bit_corr_mean_abs_offdiag"] == pytest.approx(expected)


def test_effective_rank_of_equal_singular_values():
  logits = np.zeros((10, 6))
  logits[np.arange(3), np.arange(3)] = 2.0  # Three equal singular values.
  erank, s = codes.effective_rank(logits)
  assert erank == pytest.approx(3.0)
  np.testing.assert_allclose(s[:3], 2.0)
  unequal, _ = codes.effective_rank(np.diag([10.0, 1.0, 0.1]))
  assert 1.0 < unequal < 2.0


def test_class_specific_shared_bits_usage_and_prototypes():
  num_classes, per_class = 4, 10
  labels = np.repeat(np.arange(num_classes), per_class)
  one_hot = labels[:, None] == np.arange(num_classes)[None, :]  # Specific.
  always = np.ones((len(labels), 1), bool)  # Shared.
  first_half = (labels < 2)[:, None]  # On in exactly half the classes: shared.
  bits = np.concatenate([one_hot, always, first_half], axis=1)
  out = codes.analyze_codes(_logits(bits), labels)
  np.testing.assert_array_equal(out["class_specific_owner"], [0, 1, 2, 3, -1, -1])
  np.testing.assert_array_equal(out["shared_bits"], [False] * 4 + [True, True])
  assert out["class_specific_bits_frac"] == pytest.approx(4 / 6)
  assert out["shared_bits_frac"] == pytest.approx(2 / 6)
  assert out["classes_with_specific_bit_frac"] == 1.0
  # Every image of a class has the same code: 4 distinct codes / 40 images.
  assert out["distinct_codes"] == 4 and out["code_usage"] == pytest.approx(0.1)
  # Prototypes: class c = one-hot(c) + [1, c < 2]. Classes 0/1 differ in 2
  # bits, 0/2 in 3 bits (one-hot pair + first_half), 2/3 in 2 bits.
  expected = np.array([[0, 2, 3, 3], [2, 0, 3, 3], [3, 3, 0, 2], [3, 3, 2, 0]])
  np.testing.assert_array_equal(out["prototype_hamming"], expected)
  assert out["prototype_hamming_min"] == 2
  assert out["prototype_hamming_mean"] == pytest.approx(16 / 6)
  assert out["prototype_collisions"] == 0


def test_noisy_bit_is_not_class_specific_and_mask_drops_rows():
  labels = np.repeat([0, 1], 10)
  bit = labels == 0
  bit[:2] = False  # Class 0: on for 80% < 90%.
  padded_logits = np.concatenate([_logits(bit[:, None]), np.ones((5, 1))])
  padded_labels = np.concatenate([labels, np.full(5, 1)])
  mask = np.arange(25) < 20
  out = codes.analyze_codes(padded_logits, padded_labels, mask=mask)
  assert out["num_images"] == 20
  assert out["bit_balance_mean"] == pytest.approx(8 / 20)
  assert out["class_specific_bits_frac"] == 0.0
  loose = codes.analyze_codes(padded_logits, padded_labels, mask=mask, specific_on=0.8)
  assert loose["class_specific_bits_frac"] == 1.0


def test_scalar_metrics_and_bad_input():
  out = codes.analyze_codes(np.random.default_rng(0).normal(size=(30, 8)), np.arange(30) % 3)
  scalars = codes.scalar_metrics(out)
  assert "codes/bit_entropy_mean" in scalars
  assert "codes/bit_corr" not in scalars  # Arrays are left out.
  assert all(isinstance(v, float) for v in scalars.values())
  with pytest.raises(ValueError, match="labels must be"):
    codes.analyze_codes(np.ones((4, 3)), np.zeros(5))


def test_non_finite_logits_raise_a_clear_error_unless_masked():
  # Regression: NaN logits ended in numpy's "SVD did not converge".
  logits = np.random.default_rng(1).normal(size=(20, 6))
  logits[7, 2] = np.nan
  labels = np.arange(20) % 2
  with pytest.raises(ValueError, match="logits row 7 has non-finite values"):
    codes.analyze_codes(logits, labels)
  out = codes.analyze_codes(logits, labels, mask=np.arange(20) != 7)
  assert out["num_images"] == 19.0
