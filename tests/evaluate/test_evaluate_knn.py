"""Tests for bits_jax.evaluate.knn."""

import types

import jax
import numpy as np
import pytest

from bits_jax.evaluate import knn


def _reference_knn(
    bank,
    bank_labels,
    queries,
    query_labels,
    num_classes,
    k,
    temperature,
    bank_mask=None,
    query_mask=None,
):
  """Brute-force numpy weighted k-NN: (top1, top5) accuracy."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = queries.astype(np.float64) @ bank.astype(np.float64).T
  if bank_mask is not None:
    sims[:, ~bank_mask] = -np.inf
  idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  top_sims = np.take_along_axis(sims, idx, axis=1)
  votes = np.zeros((len(queries), num_classes))
  for i in range(len(queries)):
    np.add.at(votes[i], bank_labels[idx[i]], np.exp(top_sims[i] / temperature))
  top1 = votes.argmax(1) == query_labels
  top5 = (np.argsort(-votes, axis=1, kind="stable")[:, :5] == query_labels[:, None]).any(1)
  top5 &= votes[np.arange(len(queries)), query_labels] > 0  # A class nobody voted for is no guess.
  valid = np.ones(len(queries), bool) if query_mask is None else query_mask
  return top1[valid].mean(), top5[valid].mean()


def _clustered(rng, sizes, num_classes, d, noise):
  """Gaussian clusters around shared class centers, one split per size."""
  centers = rng.normal(size=(num_classes, d))
  splits = []
  for n in sizes:
    labels = rng.integers(0, num_classes, size=n)
    feats = centers[labels] + noise * rng.normal(size=(n, d))
    splits += [feats.astype(np.float32), labels]
  return splits


def test_matches_bruteforce_reference_with_blocks():
  rng = np.random.default_rng(0)
  bank, bank_labels, queries, query_labels = _clustered(rng, (203, 37), 7, 16, noise=1.5)
  got = knn.knn_classify(
      bank,
      bank_labels,
      queries,
      query_labels,
      num_classes=7,
      ks=(5, 20),
      temperature=0.1,
      block_size=16,
  )
  for k in (5, 20):
    top1, top5 = _reference_knn(bank, bank_labels, queries, query_labels, 7, k, 0.1)
    assert got[f"knn_top1_k{k}"] == pytest.approx(top1)
    assert got[f"knn_top5_k{k}"] == pytest.approx(top5)
  # Noisy clusters: the numbers must be informative, not trivially 0 or 1.
  assert 0.3 < got["knn_top1_k20"] < 1.0


def test_block_size_does_not_change_result():
  rng = np.random.default_rng(1)
  bank, bank_labels, queries, query_labels = _clustered(rng, (150, 50), 5, 8, noise=2.0)
  kwargs = dict(num_classes=5, ks=(1, 10), temperature=0.07)
  small = knn.knn_classify(bank, bank_labels, queries, query_labels, block_size=7, **kwargs)
  big = knn.knn_classify(bank, bank_labels, queries, query_labels, block_size=4096, **kwargs)
  assert small == big


def test_sharded_bank_matches_single_device():
  rng = np.random.default_rng(2)
  bank, bank_labels, queries, query_labels = _clustered(rng, (301, 45), 10, 12, noise=2.0)
  kwargs = dict(num_classes=10, ks=(3, 20), temperature=0.07, block_size=16)
  single = knn.knn_classify(bank, bank_labels, queries, query_labels, **kwargs)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  sharded = knn.knn_classify(bank, bank_labels, queries, query_labels, mesh=mesh, **kwargs)
  assert sharded == single
  top1, _ = _reference_knn(bank, bank_labels, queries, query_labels, 10, 20, 0.07)
  assert sharded["knn_top1_k20"] == pytest.approx(top1)


def test_masked_bank_rows_are_never_neighbours():
  rng = np.random.default_rng(3)
  bank, bank_labels, queries, query_labels = _clustered(rng, (60, 20), 4, 8, noise=0.3)
  # Padding rows that would be the nearest neighbours, with wrong labels.
  decoys = np.repeat(queries, 3, axis=0)
  decoy_labels = (np.repeat(query_labels, 3) + 1) % 4
  all_bank = np.concatenate([bank, decoys])
  all_labels = np.concatenate([bank_labels, decoy_labels])
  mask = np.arange(len(all_bank)) < len(bank)
  kwargs = dict(num_classes=4, ks=(10,), block_size=8)
  clean = knn.knn_classify(bank, bank_labels, queries, query_labels, **kwargs)
  masked = knn.knn_classify(all_bank, all_labels, queries, query_labels, bank_mask=mask, **kwargs)
  unmasked = knn.knn_classify(all_bank, all_labels, queries, query_labels, **kwargs)
  assert masked == clean
  assert clean["knn_top1_k10"] == 1.0
  assert unmasked["knn_top1_k10"] < 0.5
  assert "knn_top5_k10" not in clean  # Fewer than 5 classes.


def test_query_mask_excludes_padding_and_accepts_jax_inputs():
  rng = np.random.default_rng(4)
  bank, bank_labels, queries, query_labels = _clustered(rng, (80, 10), 6, 8, noise=0.2)
  padded_q = np.concatenate([queries, np.ones((6, 8), np.float32)])
  padded_l = np.concatenate([query_labels, np.full(6, 5)])
  qmask = np.arange(16) < 10
  got = knn.knn_classify(
      jax.numpy.asarray(bank),
      jax.numpy.asarray(bank_labels),
      padded_q,
      padded_l,
      query_mask=qmask,
      num_classes=6,
      ks=(5,),
  )
  top1, top5 = _reference_knn(bank, bank_labels, padded_q, padded_l, 6, 5, 0.07, query_mask=qmask)
  assert got == {"knn_top1_k5": pytest.approx(top1), "knn_top5_k5": pytest.approx(top5)}


def test_bad_inputs_raise_clear_errors():
  bank = np.ones((4, 3), np.float32)
  labels = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match="exceeds the 4 valid bank rows"):
    knn.knn_classify(bank, labels, bank, labels, num_classes=2, ks=(20,))
  with pytest.raises(ValueError, match="feature dims differ"):
    knn.knn_classify(bank, labels, np.ones((4, 5)), labels, num_classes=2, ks=(2,))
  with pytest.raises(ValueError, match="check num_classes"):
    knn.knn_classify(bank, labels + 3, bank, labels, num_classes=2, ks=(2,))


def test_top5_counts_only_classes_with_votes():
  # Regression: with k=1 only one class gets a vote, but top_k over the votes filled the top 5
  # with zero-vote classes (lowest ids first), so a query of class 0-3 counted as a top-5 hit.
  bank = np.eye(10, dtype=np.float32)
  bank_labels = np.arange(10)
  queries = bank[5:] + 0.01
  query_labels = np.zeros(5, np.int64)  # Class 0: never among the neighbours' classes.
  got = knn.knn_classify(bank, bank_labels, queries, query_labels, num_classes=10, ks=(1,))
  assert got == {"knn_top1_k1": 0.0, "knn_top5_k1": 0.0}
  rng = np.random.default_rng(6)
  bank, bank_labels, queries, query_labels = _clustered(rng, (90, 40), 12, 8, noise=2.0)
  got = knn.knn_classify(bank, bank_labels, queries, query_labels, num_classes=12, ks=(1, 2))
  assert got["knn_top5_k1"] == got["knn_top1_k1"]  # DINO: top-5 is top-1 when k = 1.
  _, top5 = _reference_knn(bank, bank_labels, queries, query_labels, 12, 2, 0.07)
  assert got["knn_top5_k2"] == pytest.approx(top5)


def test_non_finite_features_raise_unless_masked():
  rng = np.random.default_rng(7)
  bank, bank_labels, queries, query_labels = _clustered(rng, (40, 10), 5, 8, noise=1.0)
  kwargs = dict(num_classes=5, ks=(5,))
  bad_bank = bank.copy()
  bad_bank[3, 1] = np.nan
  with pytest.raises(ValueError, match="bank_feats row 3 has non-finite"):
    knn.knn_classify(bad_bank, bank_labels, queries, query_labels, **kwargs)
  bad_q = queries.copy()
  bad_q[2, 0] = np.inf
  with pytest.raises(ValueError, match="query_feats row 2 has non-finite"):
    knn.knn_classify(bank, bank_labels, bad_q, query_labels, **kwargs)
  with pytest.raises(ValueError, match="query_feats row 2 has non-finite"):
    knn.knn_predict(bank, bank_labels, bad_q, num_classes=5, k=5)
  # Masked (padding) rows may hold anything.
  bank_mask, query_mask = np.arange(40) != 3, np.arange(10) != 2
  masked = knn.knn_classify(
      bad_bank,
      bank_labels,
      bad_q,
      query_labels,
      bank_mask=bank_mask,
      query_mask=query_mask,
      **kwargs,
  )
  clean = knn.knn_classify(
      np.delete(bank, 3, 0),
      np.delete(bank_labels, 3),
      queries[query_mask],
      query_labels[query_mask],
      **kwargs,
  )
  assert masked == clean


def test_knn_predict_agrees_with_classify_and_mesh():
  rng = np.random.default_rng(5)
  bank, bank_labels, queries, query_labels = _clustered(rng, (120, 33), 6, 8, noise=1.5)
  preds = knn.knn_predict(bank, bank_labels, queries, num_classes=6, k=10, block_size=8)
  assert preds.shape == (33,) and preds.dtype == np.int32
  acc = knn.knn_classify(bank, bank_labels, queries, query_labels, num_classes=6, ks=(10,))[
      "knn_top1_k10"
  ]
  assert np.mean(preds == query_labels) == pytest.approx(acc)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  np.testing.assert_array_equal(
      knn.knn_predict(bank, bank_labels, queries, num_classes=6, k=10, block_size=8, mesh=mesh),
      preds,
  )


def test_multi_hot_labels_name_the_evaluator_to_use():
  # Was "bank_labels must have 1 dims, got shape (40, 3)."
  rng = np.random.default_rng(0)
  split = {
      "cls": rng.normal(size=(40, 8)).astype(np.float32),
      "label": rng.random((40, 3)) < 0.5,
      "mask": np.ones(40, bool),
  }
  ctx = types.SimpleNamespace(features=lambda name: split, num_classes=3, mesh=None)
  with pytest.raises(ValueError, match="multi-hot.*evals.retrieval.*evals.knn.at_end=False"):
    knn.run(ctx)
