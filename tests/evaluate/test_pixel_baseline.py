"""pixel_baseline: the k-NN and retrieval protocols on eval-pipeline pixels vs numpy references."""

import ml_collections
import numpy as np
import pytest

from bits_jax import config_defaults
from bits_jax.evaluate import pixel_baseline


def _reference_top1(bank, bank_labels, queries, query_labels, k, temperature, classes):
  """Weighted cosine k-NN top-1 in float64 (ties between equal sims cannot occur here)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(queries.astype(np.float64)) @ unit(bank.astype(np.float64)).T
  top = np.argsort(-sims, axis=1)[:, :k]
  votes = np.zeros((len(queries), classes))
  for i, row in enumerate(top):
    np.add.at(votes[i], bank_labels[row], np.exp(sims[i, row] / temperature))
  return float(np.mean(votes.argmax(1) == query_labels))


def _reference_map_all(database, database_labels, queries, query_labels):
  """Mean over queries of AP over the whole cosine ranking, float64 (no ties here)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(queries.astype(np.float64)) @ unit(database.astype(np.float64)).T
  aps = []
  for i, row in enumerate(sims):
    relevant = database_labels[np.argsort(-row)] == query_labels[i]
    precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    aps.append(precision[relevant].mean())
  return float(np.mean(aps))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """3 classes of 8x8 gray images: a bright band at a class-specific row, plus noise."""
  rng = np.random.default_rng(0)

  def make(n):
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 90, (n, 8, 8), dtype=np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c : 2 * c + 2] += 160
    return images, labels

  images, labels = make(48)
  test_images, test_labels = make(21)
  path = str(tmp_path_factory.mktemp("pix") / "tiny.npz")
  np.savez(path, images=images, labels=labels, test_images=test_images, test_labels=test_labels)
  return path, images, labels, test_images, test_labels


def _config(path):
  config = config_defaults.base_config()
  config.input.dataset = f"npz:{path}"
  config.input.num_channels = 1
  config.input.crops.global_size = 8
  config.input.eval_batch_size = 16  # 48 and 21 rows: padded batches, masked rows
  config.input.augment.normalize_mean = (0.5,)
  config.input.augment.normalize_std = (0.25,)
  config.evals.knn.update(dict(bank_split="train", query_split="test", ks=(1, 5), temperature=0.1))
  return config


@pytest.mark.parametrize("normalized", [True, False])
def test_matches_numpy_reference(dataset, normalized):
  path, images, labels, test_images, test_labels = dataset
  shift = 0.5 if normalized else 0.0
  scale = 0.25 if normalized else 1.0
  prep = lambda x: (x.reshape(len(x), -1) / 255.0 - shift) / scale
  results = pixel_baseline.pixel_knn(_config(path), normalized=normalized)
  for k in (1, 5):
    expected = _reference_top1(prep(images), labels, prep(test_images), test_labels, k, 0.1, 3)
    assert results[f"knn_top1_k{k}"] == pytest.approx(expected, abs=1e-9)
  assert results["knn_top1_k5"] > 0.9  # the class band is visible in the pixels


def test_features_have_pixels_labels_and_mask(dataset):
  path, images, labels, *_ = dataset
  feats = pixel_baseline.pixel_features(_config(path), "train", normalized=False)
  valid = feats["mask"]
  assert feats["pixels"].shape == (len(valid), 64) and valid.sum() == len(images)
  np.testing.assert_allclose(feats["pixels"][valid], images.reshape(48, -1) / 255.0, atol=1e-5)
  np.testing.assert_array_equal(feats["label"][valid], labels)


def test_needs_a_knn_entry(dataset):
  config = _config(dataset[0])
  config.evals.knn.type = "linear"
  with pytest.raises(ValueError, match="no entry of type 'knn'"):
    pixel_baseline.knn_entry(config)


def test_knn_entry_without_optional_keys_takes_the_evaluator_defaults(dataset):
  # Regression: an entry with only `type` (and ks) raised AttributeError: 'bank_split'.
  config = _config(dataset[0])
  full = pixel_baseline.pixel_knn(config)
  config.evals = ml_collections.ConfigDict({"nn": dict(type="knn", ks=(1, 5))})
  config.evals.nn.temperature = 0.1
  assert pixel_baseline.pixel_knn(config) == full  # train bank, test queries by default
  del config.evals.nn["temperature"]
  assert set(pixel_baseline.pixel_knn(config)) == {"knn_top1_k1", "knn_top1_k5"}


def test_rows_read_once_equal_each_variant(dataset, monkeypatch):
  config = _config(dataset[0])
  reads = []
  eval_pixels = pixel_baseline._eval_pixels  # pylint: disable=protected-access
  monkeypatch.setattr(
      pixel_baseline, "_eval_pixels", lambda c, split: reads.append(split) or eval_pixels(c, split)
  )
  rows = pixel_baseline.pixel_knn_rows(config)
  assert reads == ["train", "test"]  # both variants from one read of each split
  monkeypatch.setattr(pixel_baseline, "_eval_pixels", eval_pixels)
  for normalized in (False, True):
    assert rows[normalized] == pixel_baseline.pixel_knn(config, normalized=normalized)


def test_unnormalize_is_per_channel():
  config = config_defaults.base_config()
  config.input.num_channels = 3
  config.input.augment.normalize_mean = (0.1, 0.2, 0.3)
  config.input.augment.normalize_std = (0.5, 0.25, 2.0)
  raw = np.random.default_rng(0).random((4, 2, 2, 3)).astype(np.float32)
  normalised = (raw - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
  back = pixel_baseline._unnormalize(config, normalised.reshape(4, -1).astype(np.float32))  # pylint: disable=protected-access
  np.testing.assert_allclose(back, raw.reshape(4, -1), atol=1e-6)


def test_retrieval_matches_numpy_reference(dataset):
  path, images, labels, test_images, test_labels = dataset
  config = _config(path)
  config.evals.retrieval.update(dict(query_split="test", database_split="train", ks=(5,)))
  rows = pixel_baseline.pixel_retrieval(pixel_baseline.PixelContext(config, normalized=False))
  prep = lambda x: x.reshape(len(x), -1) / 255.0
  expected = _reference_map_all(prep(images), labels, prep(test_images), test_labels)
  assert rows["retrieval/map_all"] == pytest.approx(expected, abs=1e-5)
  assert rows["retrieval/num_queries"] == len(test_images)
  assert not any("codes" in key for key in rows)  # pixels have no head, so no binary code


def test_knn_and_retrieval_share_one_read_of_each_split(dataset, monkeypatch):
  config = _config(dataset[0])
  config.evals.retrieval.update(dict(query_split="test", database_split="train", ks=(5,)))
  reads = []
  eval_pixels = pixel_baseline._eval_pixels  # pylint: disable=protected-access
  monkeypatch.setattr(
      pixel_baseline, "_eval_pixels", lambda c, split: reads.append(split) or eval_pixels(c, split)
  )
  context = pixel_baseline.PixelContext(config, normalized=False)
  knn_rows = pixel_baseline.pixel_knn_rows(config, context=context)
  retrieval_rows = pixel_baseline.pixel_retrieval(context)
  assert sorted(reads) == ["test", "train"]  # the end of a run reads each split once
  assert knn_rows[False] == pixel_baseline.pixel_knn(config, normalized=False)
  assert retrieval_rows["retrieval/map_all"] > 0.5
