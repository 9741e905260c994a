"""Tests for bits_jax.evaluate.dense."""

import numpy as np
import pytest

from bits_jax.evaluate import dense

_PATCH = 4


def _square_data(seed, n):
  images, masks = dense.synthetic_squares(seed, n, image_size=32)
  return images, dense.downsample_mask(masks, _PATCH, num_classes=2)


def _intensity_features(images):
  # [mean intensity, 1]: cosine similarity then separates bright from dark.
  mean = dense.patch_mean(images, _PATCH)
  return np.concatenate([mean, np.ones_like(mean)], axis=-1)


def test_informative_patch_features_segment_the_square():
  bank_images, bank_labels = _square_data(0, 24)
  query_images, query_labels = _square_data(1, 8)
  got = dense.patch_knn_segmentation(
      _intensity_features(bank_images),
      bank_labels,
      _intensity_features(query_images),
      query_labels,
      num_classes=2,
      k=10,
  )
  assert got["seg_miou"] >= 0.85
  assert got["seg_pixel_acc"] >= 0.93


def test_random_features_score_at_chance():
  bank_images, bank_labels = _square_data(0, 24)
  query_images, query_labels = _square_data(1, 8)
  rng = np.random.default_rng(0)
  got = dense.patch_knn_segmentation(
      rng.normal(size=bank_labels.shape + (16,)),
      bank_labels,
      rng.normal(size=query_labels.shape + (16,)),
      query_labels,
      num_classes=2,
      k=10,
  )
  fg = query_labels.mean()
  # Predicting background everywhere: mIoU = (1 - fg) / 2 (class 1 IoU = 0).
  assert 0.1 < fg < 0.4
  assert got["seg_miou"] < 0.55
  assert got["seg_pixel_acc"] < 1 - fg + 0.05


def test_downsample_mask_majority_and_scores_by_hand():
  mask = np.zeros((1, 4, 4), np.int32)
  mask[0, :2, :2] = 1  # Patch (0, 0) all class 1.
  mask[0, 2, 2:] = 1  # Patch (1, 1): 2 of 4 pixels -> tie -> class 0.
  mask[0, :2, 2] = 2  # Patch (0, 1): 2 of 4 class 2 -> tie -> class 0.
  mask[0, 2:, 0] = 2
  mask[0, 3, 1] = 2  # Patch (1, 0): 3 of 4 class 2 -> class 2.
  np.testing.assert_array_equal(dense.downsample_mask(mask, 2, 3), [[[1, 0], [2, 0]]])
  # labels 0,0,1,1 vs preds 0,1,1,1: IoU_0 = 1/2, IoU_1 = 2/3; acc = 3/4.
  confusion = np.array([[1, 1], [0, 2]])
  got = dense.segmentation_scores(confusion)
  assert got["seg_miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert got["seg_pixel_acc"] == 0.75


def test_ignore_index_and_bank_subsample():
  bank_images, bank_labels = _square_data(2, 16)
  query_images, query_labels = _square_data(3, 4)
  bank_feats = _intensity_features(bank_images)
  query_feats = _intensity_features(query_images)
  # Ignored bank patches get decoy features of the wrong class.
  bank_labels = bank_labels.copy()
  bank_labels[:4] = -1
  bank_feats[:4] = _intensity_features(np.ones_like(bank_images[:4]))
  query_labels = query_labels.copy()
  query_labels[0] = -1
  got = dense.patch_knn_segmentation(
      bank_feats,
      bank_labels,
      query_feats,
      query_labels,
      num_classes=2,
      k=5,
      max_bank_patches=500,
      seed=0,
  )
  assert got["seg_miou"] >= 0.85
  with pytest.raises(ValueError, match="downsample_mask"):
    dense.patch_knn_segmentation(
        bank_feats, bank_labels[:, :4], query_feats, query_labels, num_classes=2
    )
  with pytest.raises(ValueError, match="multiple of patch_size"):
    dense.downsample_mask(np.zeros((1, 5, 4)), 2, 2)
