"""Tests for bits_jax.evaluate.retrieval."""

import numpy as np
import pytest

from bits_jax.evaluate import retrieval


def _reference_metrics(dist, rel, r_cut, k):
  """numpy mAP@R (DeepHash convention) and precision@k, ties by index."""
  aps, precs = [], []
  for d, g in zip(dist, rel):
    g = g[np.argsort(d, kind="stable")].astype(float)
    top = g[:r_cut]
    hits = np.cumsum(top)
    aps.append((top * hits / np.arange(1, len(top) + 1)).sum() / hits[-1] if hits[-1] else 0.0)
    precs.append(g[:k].mean())
  return np.mean(aps), np.mean(precs)


@pytest.mark.parametrize("n_bits", [1, 7, 32, 33, 100])
def test_packed_hamming_equals_unpacked_count(n_bits):
  rng = np.random.default_rng(n_bits)
  a = rng.random((9, n_bits)) > 0.5
  b = rng.random((13, n_bits)) > 0.5
  wa, wb = retrieval.pack_bits(a), retrieval.pack_bits(b)
  assert wa.shape == (9, -(-n_bits // 32)) and wa.dtype == np.uint32
  expected = np.array([[np.count_nonzero(x != y) for y in b] for x in a])
  np.testing.assert_array_equal(retrieval.hamming_distance(wa, wb), expected)


def test_pack_bits_layout_is_lsb_first():
  bits = np.zeros((1, 40), bool)
  bits[0, [0, 2, 31, 32]] = True
  words = np.asarray(retrieval.pack_bits(bits))
  assert words.tolist() == [[(1 << 0) | (1 << 2) | (1 << 31), 1]]
  assert retrieval.binarize(np.array([[-1.0, 0.0, 0.5]])).tolist() == [[False, False, True]]


def test_hand_checked_map_and_tie_break_by_index():
  # Query 0000 (label 0) against five database codes:
  #   idx code  dist label relevant
  #   0   0001  1    0     yes
  #   1   0000  0    1     no
  #   2   0011  2    0     yes
  #   3   0001  1    1     no     (ties with idx 0; idx 0 ranks first)
  #   4   1111  4    0     yes
  # Ranking (dist, idx): 1, 0, 3, 2, 4 -> relevance 0, 1, 0, 1, 1.
  # AP@all = (1/2 + 2/4 + 3/5) / 3 = 1.6 / 3; AP@2 = (1/2) / 1 = 0.5.
  # P@1 = 0, P@2 = 1/2, P@5 = 3/5; within radius 1: idx 1, 0, 3 -> 1/3.
  db = np.array([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], bool)
  query = np.zeros((1, 4), bool)
  got = retrieval.hamming_retrieval(
      query,
      np.array([0]),
      db,
      np.array([0, 1, 0, 1, 0]),
      map_at=(None, 2),
      precision_at=(1, 2, 5),
      radius=1,
  )
  assert got == pytest.approx({
      "map@all": 1.6 / 3,
      "map@2": 0.5,
      "precision@1": 0.0,
      "precision@2": 0.5,
      "precision@5": 0.6,
      "precision_r1": 1 / 3,
  })


def test_query_without_relevant_items_scores_zero():
  db = np.array([[1, 0], [0, 1]], bool)
  got = retrieval.hamming_retrieval(
      np.array([[1, 0], [1, 0]], bool),
      np.array([0, 5]),
      db,
      np.array([0, 1]),
      map_at=(None,),
      precision_at=(1,),
      radius=0,
  )
  # Query 0: AP 1, P@1 1, P_r0 1. Query 1 (label 5): all zeros.
  assert got == {"map@all": 0.5, "precision@1": 0.5, "precision_r0": 0.5}


@pytest.mark.parametrize("block_size", [None, 4])
def test_hamming_map_matches_numpy_reference_with_many_ties(block_size):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=70)
  centers = rng.random((3, 6)) > 0.5
  bits = centers[labels] ^ (rng.random((70, 6)) < 0.25)  # 6 bits: many ties.
  q, db = bits[:13], bits[13:]
  ql, dbl = labels[:13], labels[13:]
  got = retrieval.hamming_retrieval(
      q, ql, db, dbl, map_at=(None, 20), precision_at=(10,), block_size=block_size
  )
  dist = (q[:, None, :] != db[None, :, :]).sum(-1)
  rel = ql[:, None] == dbl[None, :]
  map_all, p10 = _reference_metrics(dist, rel, db.shape[0], 10)
  map_20, _ = _reference_metrics(dist, rel, 20, 10)
  assert got["map@all"] == pytest.approx(map_all)
  assert got["map@20"] == pytest.approx(map_20)
  assert got["precision@10"] == pytest.approx(p10)
  # Packed words in, same numbers out.
  packed = retrieval.hamming_retrieval(
      retrieval.pack_bits(q),
      ql,
      retrieval.pack_bits(db),
      dbl,
      map_at=(None, 20),
      precision_at=(10,),
      block_size=block_size,
  )
  assert packed == got


def test_cosine_retrieval_matches_reference_and_multihot_labels():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(40, 5)).astype(np.float32)
  multihot = rng.random((40, 4)) > 0.6
  q, db = feats[:8], feats[8:]
  got = retrieval.cosine_retrieval(
      q, multihot[:8], db, multihot[8:], map_at=(None, 1000), precision_at=(5,)
  )
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
  rel = (multihot[:8].astype(int) @ multihot[8:].astype(int).T) > 0
  map_all, p5 = _reference_metrics(-(qn @ dbn.T), rel, 32, 5)
  assert got["map@all"] == pytest.approx(map_all, rel=1e-5)
  assert got["map@1000"] == got["map@all"]  # R clipped to the database.
  assert got["precision@5"] == pytest.approx(p5)


def test_hamming_topk_matches_stable_sort():
  rng = np.random.default_rng(2)
  q = rng.random((5, 40)) > 0.5
  db = rng.random((101, 40)) > 0.5
  dist, idx = retrieval.hamming_topk(
      retrieval.pack_bits(q), retrieval.pack_bits(db), 7, db_block=16
  )
  full = (q[:, None, :] != db[None, :, :]).sum(-1)
  order = np.argsort(full, axis=1, kind="stable")[:, :7]
  np.testing.assert_array_equal(idx, order)
  np.testing.assert_array_equal(dist, np.take_along_axis(full, order, 1))


def test_bad_inputs_raise_clear_errors():
  bits = np.ones((3, 8), bool)
  with pytest.raises(ValueError, match="database size"):
    retrieval.hamming_retrieval(bits, np.zeros(3), bits, np.zeros(3), precision_at=(10,))
  with pytest.raises(TypeError, match="pass bool bits"):
    retrieval.hamming_retrieval(np.ones((3, 8)), np.zeros(3), bits, np.zeros(3), precision_at=(1,))
  with pytest.raises(ValueError, match="same number of bits"):
    retrieval.hamming_distance(
        retrieval.pack_bits(np.ones((2, 40), bool)), retrieval.pack_bits(bits)
    )
  with pytest.raises(ValueError, match="k=4"):
    retrieval.hamming_topk(retrieval.pack_bits(bits), retrieval.pack_bits(bits), 4)


@pytest.mark.parametrize("m,k,group", [(4096, 7, 16), (4096, 300, 16), (100, 5, 16), (512, 31, 8)])
def test_smallest_k_is_exact_with_ties(m, k, group):
  rng = np.random.default_rng(m + k)
  values = rng.integers(0, 6, size=(4, m)).astype(np.float32)  # Many ties.
  got_vals, got_pos = retrieval.smallest_k(values, k, group=group)
  order = np.argsort(values, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(got_pos, order)
  np.testing.assert_array_equal(got_vals, np.take_along_axis(values, order, 1))


def test_hamming_topk_grouped_blocks_with_padding():
  rng = np.random.default_rng(3)
  q = rng.random((6, 12)) > 0.5  # 12 bits: heavy ties.
  db = rng.random((3001, 12)) > 0.5  # Not a multiple of the block.
  dist, idx = retrieval.hamming_topk(
      retrieval.pack_bits(q), retrieval.pack_bits(db), 9, db_block=1024
  )
  full = (q[:, None, :] != db[None, :, :]).sum(-1)
  order = np.argsort(full, axis=1, kind="stable")[:, :9]
  np.testing.assert_array_equal(idx, order)
  np.testing.assert_array_equal(dist, np.take_along_axis(full, order, 1))
