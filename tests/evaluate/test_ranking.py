"""Tests for bits_jax.evaluate.ranking: exact AP@ALL / AP@k / P@k with expected ties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from bits_jax.evaluate import ranking


def _ap_terms(rel_sorted, ks):
  """Plain (tie-free) sums of one ordering: R, AP sum, AP sums @k, hits @k."""
  rel_sorted = np.asarray(rel_sorted, float)
  hits = np.cumsum(rel_sorted)
  terms = rel_sorted * hits / np.arange(1, len(rel_sorted) + 1)
  return np.array(
      [hits[-1], terms.sum()] + [terms[:k].sum() for k in ks] + [hits[k - 1] for k in ks]
  )


def _brute_sums(scores, rel, ks):
  """Average of _ap_terms over every order of each tie group (higher score first)."""
  out = []
  for s, g in zip(scores, rel):
    values = sorted(set(s.tolist()), reverse=True)
    groups = [np.flatnonzero(s == v) for v in values]
    total, count = 0.0, 0
    for perm in itertools.product(*(itertools.permutations(grp) for grp in groups)):
      total = total + _ap_terms(g[np.concatenate(perm)], ks)
      count += 1
    out.append(total / count)
  return np.array(out)


def _metrics(sums, ks):
  return ranking.summarize(sums, ks)


def test_scored_path_matches_permutation_average_with_ties():
  rng = np.random.default_rng(0)
  ks = (1, 3, 5)
  # 4 queries x 7 items; scores from 3 levels: many ties; q 3 has no relevant item.
  levels = np.array([0.5, 0.25, -0.125], np.float32)
  scores = levels[rng.integers(0, 3, size=(4, 7))]
  labels_db = rng.integers(0, 2, size=7)
  labels_q = np.array([0, 1, 0, 5])
  rel = labels_q[:, None] == labels_db[None, :]
  # q . x = score: queries are one-hot rows over a [7, 7] database carrying the scores.
  queries = np.eye(4, 7, dtype=np.float32)
  database = np.zeros((7, 7), np.float32)
  database[:, :4] = scores.T
  got = ranking.scored_sums(
      queries, labels_q.astype(np.int32), database, labels_db.astype(np.int32), ks=ks
  )
  want = _brute_sums(scores, rel, ks)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  summary = _metrics(got, ks)
  assert summary["queries_without_relevant"] == 1.0


def test_hamming_histograms_match_permutation_average_and_scored_path():
  rng = np.random.default_rng(1)
  ks = (1, 2, 6)
  bits_q = rng.random((5, 3)) > 0.5  # 3 bits: distances 0..3, heavy ties.
  bits_db = rng.random((6, 3)) > 0.5
  labels_q = rng.integers(0, 2, size=5).astype(np.int32)
  labels_db = rng.integers(0, 2, size=6).astype(np.int32)
  dist = (bits_q[:, None] != bits_db[None]).sum(-1)
  rel = labels_q[:, None] == labels_db[None, :]
  (hist,) = ranking.hamming_histograms(
      ranking.pack_rows(bits_q),
      labels_q,
      ranking.pack_rows(bits_db),
      labels_db,
      variants=[(0, 1, 3)],
      db_block=4,
  )
  np.testing.assert_array_equal(hist[..., 1].sum(1), rel.sum(1))
  got = ranking.histogram_sums(hist, ks)
  want = _brute_sums(-dist.astype(float), rel, ks)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  # The sort path on scores -d / 4 gives the same numbers (float32).
  pm = np.where(bits_q, 1.0, -1.0).astype(np.float32)
  db_pm = np.where(bits_db, 1.0, -1.0).astype(np.float32)
  # -d / 4 = (q . x - 3) / 8 for +-1 codes of 3 bits.
  q_aug = np.concatenate([pm / 8, np.full((5, 1), -3 / 8, np.float32)], 1)
  db_aug = np.concatenate([db_pm, np.ones((6, 1), np.float32)], 1)
  scored = ranking.scored_sums(q_aug, labels_q, db_aug, labels_db, ks=ks)
  np.testing.assert_allclose(scored, want, rtol=1e-5, atol=1e-6)


def test_map_all_matches_sklearn_without_ties_multilabel_and_mesh():
  rng = np.random.default_rng(2)
  nq, ndb, classes = 9, 40, 4
  q = rng.normal(size=(nq, 6)).astype(np.float32) / 8
  db = rng.normal(size=(ndb, 6)).astype(np.float32) / 8
  q_hot = rng.random((nq, classes)) > 0.6
  q_hot[0] = [True, False, False, False]
  db_hot = rng.random((ndb, classes)) > 0.6
  q_lab, multi = ranking.prepare_labels(q_hot, "q")
  db_lab, _ = ranking.prepare_labels(db_hot, "db")
  assert multi
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sums = ranking.scored_sums(q, q_lab, db, db_lab, ks=(5,), mesh=mesh, max_elements=80)
  scores = q @ db.T
  rel = (q_hot.astype(int) @ db_hot.astype(int).T) > 0
  want = [sk_metrics.average_precision_score(r, s) if r.any() else 0.0 for r, s in zip(rel, scores)]
  assert _metrics(sums, (5,))["map_all"] == pytest.approx(np.mean(want), rel=1e-5)
  np.testing.assert_allclose(sums[:, 0], rel.sum(1))


def test_query_excluding_itself():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(12, 5)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = (np.arange(12) % 3).astype(np.int32)
  got = ranking.scored_sums(x, labels, x, labels, ks=(2,), query_self=np.arange(12))
  for i in range(12):
    keep = np.arange(12) != i
    want = _brute_sums((x[i : i + 1] @ x[keep].T), (labels[keep] == labels[i])[None], (2,))
    np.testing.assert_allclose(got[i], want[0], rtol=1e-5)
  codes = ranking.pack_rows(x > 0)
  (hist,) = ranking.hamming_histograms(
      codes,
      labels,
      codes,
      labels,
      variants=[(0, 1, 5)],
      query_self=np.arange(12),
      self_rel=np.ones(12, bool),
  )
  assert hist.sum() == 12 * 11
  np.testing.assert_array_equal(hist[..., 1].sum(1), np.full(12, 3))


def test_order_keys_sort_by_descending_score_with_relevance_bit():
  s = np.array([[0.5, -0.0, 0.0, -0.75, 1.0, 0.5]], np.float32)
  rel = np.array([[1, 0, 1, 0, 0, 0]], bool)
  keys = np.asarray(ranking.order_keys(s, rel))
  order = np.argsort(keys[0] >> 1, kind="stable")
  assert s[0, order].tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, -0.75]
  assert (keys[0] & 1).tolist() == [1, 0, 1, 0, 0, 0]
  assert keys[0, 1] >> 1 == keys[0, 2] >> 1  # -0.0 ties with 0.0.


def _tied_keys(rng, rows, n, max_group):
  """Sorted order_keys-like keys [rows, n]: runs of 1..max_group equal scores, random bit 0."""
  keys = np.empty((rows, n), np.uint32)
  for row in keys:
    sizes = []
    while sum(sizes) < n:
      sizes.append(int(rng.integers(1, max_group + 1)))
    scores = np.repeat(np.arange(len(sizes), dtype=np.uint32), sizes)[:n]
    row[:] = (scores << 1) | rng.integers(0, 2, n).astype(np.uint32)
  return keys


@pytest.mark.parametrize("max_group, too_long", [(8, False), (9, True)])
def test_short_tie_bounds_equal_the_scanned_ones(max_group, too_long):
  rng = np.random.default_rng(5)
  keys = _tied_keys(rng, 6, 300, max_group)
  keys[:, -max_group:] = keys[:, -max_group:] & 1 | np.uint32(300 << 1)  # a last, new score
  rel = (keys & 1).astype(np.int32)
  hits = np.cumsum(rel, axis=1, dtype=np.int32)
  new_score = (keys[:, 1:] >> 1) != (keys[:, :-1] >> 1)
  is_start = np.concatenate([np.ones((6, 1), bool), new_score], axis=1)
  is_end = np.concatenate([new_score, np.ones((6, 1), bool)], axis=1)
  short, longer = ranking._short_tie_bounds(  # pylint: disable=protected-access
      is_start, is_end, hits, rel, ranking.SHORT_TIE_GROUP
  )
  scanned = ranking._scanned_tie_bounds(is_start, is_end, hits, rel)  # pylint: disable=protected-access
  assert bool(longer) == too_long  # the last max_group ranks of every row are one group
  if not too_long:
    for a, b in zip(short, scanned):
      np.testing.assert_array_equal(a, b)
  sums = jax.jit(ranking.sorted_sums, static_argnums=(1, 2))
  np.testing.assert_allclose(sums(keys, (1, 50)), sums(keys, (1, 50), 0), rtol=1e-6, atol=1e-6)


def test_host_sort_on_cpu_equals_xla_sort():
  keys = np.random.RandomState(0).randint(0, 50, size=(5, 301)).astype(np.uint32)  # ties
  keys[:, :3] = 0xFFFFFFFE
  host = jax.jit(lambda k: ranking.sort_rows(k, on_cpu=True))(keys)
  np.testing.assert_array_equal(host, jax.jit(lambda k: jnp.sort(k, axis=1))(keys))
  np.testing.assert_array_equal(host, ranking.sort_rows(jnp.asarray(keys), on_cpu=False))
