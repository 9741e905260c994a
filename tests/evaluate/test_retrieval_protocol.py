"""Tests for the paper's retrieval protocol in bits_jax.evaluate.retrieval."""

import os
import types

import jax
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from bits_jax.evaluate import retrieval


def _sklearn_map(scores, rel):
  return np.mean(
      [sk_metrics.average_precision_score(r, s) if r.any() else 0.0 for r, s in zip(rel, scores)]
  )


def _precision_at(scores, rel, k):
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(rel, order, 1).mean()


def test_feature_retrieval_matches_sklearn_with_masks_and_multilabel():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(11, 8)).astype(np.float32)
  db = rng.normal(size=(50, 8)).astype(np.float32)
  q_hot, db_hot = rng.random((11, 5)) > 0.7, rng.random((50, 5)) > 0.7
  q_mask, db_mask = np.arange(11) < 9, np.arange(50) % 7 != 3
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  got = retrieval.feature_retrieval(
      q,
      q_hot,
      db,
      db_hot,
      ks=(1, 5),
      query_mask=q_mask,
      db_mask=db_mask,
      mesh=mesh,
      max_elements=64,
  )
  qn = q[q_mask] / np.linalg.norm(q[q_mask], axis=1, keepdims=True)
  dbn = db[db_mask] / np.linalg.norm(db[db_mask], axis=1, keepdims=True)
  scores = qn @ dbn.T
  rel = (q_hot[q_mask].astype(int) @ db_hot[db_mask].astype(int).T) > 0
  assert got["map_all"] == pytest.approx(_sklearn_map(scores, rel), rel=1e-5)
  assert got["precision@5"] == pytest.approx(_precision_at(scores, rel, 5))
  assert got["num_queries"] == 9 and got["num_database"] == db_mask.sum()
  assert got["queries_without_relevant"] == float((~rel.any(1)).sum())
  # Padding rows change nothing: the unpadded arrays give the same numbers.
  plain = retrieval.feature_retrieval(
      q[q_mask], q_hot[q_mask], db[db_mask], db_hot[db_mask], ks=(1, 5)
  )
  assert plain == pytest.approx(got, rel=1e-6)


def test_asymmetric_distance_matches_numpy():
  rng = np.random.default_rng(1)
  p = rng.random((4, 40)).astype(np.float32)
  b = rng.random((7, 40)) > 0.5
  want = np.abs(p[:, None, :] - b[None, :, :]).sum(-1)
  np.testing.assert_allclose(retrieval.asymmetric_distance(p, b), want, rtol=1e-5, atol=1e-4)


def test_code_retrieval_variants_asymmetric_and_self_exclusion():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, size=40)
  logits = rng.normal(size=(40, 64)) + 1.5 * (labels[:, None] == np.arange(64) % 3)
  q, db, ql, dbl = logits[:10], logits[10:], labels[:10], labels[10:]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  got = retrieval.code_retrieval(
      q,
      ql,
      db,
      dbl,
      ks=(3,),
      code_lengths=(128, 64, 16, 40),
      seed=5,
      query_block=4,
      db_block=8,
      mesh=mesh,
  )
  assert "codes/128/map_all" not in got and got["codes/num_bits"] == 64
  assert {
      "codes/64/map_all",
      "codes/16/map_all",
      "codes/random16/map_all",
      "codes/40/map_all",
      "asym/random40/map_all",
  } <= set(got)
  assert "codes/random64/map_all" not in got  # A random permutation of all bits: the same.
  # A variant equals the full-code evaluation of its bits.
  for name, idx in (
      ("16", np.arange(16)),
      ("random16", retrieval.subsample_bits(64, 16, mode="random", seed=5 + 2)),
      ("40", np.arange(40)),
  ):
    alone = retrieval.code_retrieval(
        q[:, idx], ql, db[:, idx], dbl, ks=(3,), code_lengths=(len(idx),), random_subsets=False
    )
    for key in ("map_all", "map@3", "precision@3"):
      assert got[f"codes/{name}/{key}"] == pytest.approx(alone[f"codes/{len(idx)}/{key}"])
      assert got[f"asym/{name}/{key}"] == pytest.approx(alone[f"asym/{len(idx)}/{key}"], rel=1e-5)
  # Asymmetric distances are continuous: no ties, sklearn applies.
  probs = 1 / (1 + np.exp(-q))
  dist = np.abs(probs[:, None, :] - (db > 0)[None]).sum(-1)
  rel = ql[:, None] == dbl[None]
  assert got["asym/64/map_all"] == pytest.approx(_sklearn_map(-dist, rel), rel=1e-5)
  # Queries drawn from the database leave themselves out: k = 29 is the most allowed.
  own = retrieval.code_retrieval(
      db,
      dbl,
      db,
      dbl,
      ks=(29,),
      code_lengths=(64,),
      random_subsets=False,
      asymmetric=False,
      query_self=np.arange(30),
  )
  assert own["codes/64/precision@29"] == pytest.approx(
      np.mean([(np.delete(dbl, i) == dbl[i]).mean() for i in range(30)])
  )
  with pytest.raises(ValueError, match=r"\[1, 29\]"):
    retrieval.code_retrieval(db, dbl, db, dbl, ks=(30,), query_self=np.arange(30))


def test_run_with_fake_context(tmp_path):

  def split(n, seed):
    r = np.random.default_rng(seed)
    labels = r.integers(0, 4, size=n)
    cls = r.normal(size=(n, 16)).astype(np.float32) + 2 * np.eye(4, 16)[labels]
    logits = r.normal(size=(n, 32)).astype(np.float32) + np.eye(4, 32)[labels] * 3
    mask = np.ones(n, bool)
    mask[-2:] = False
    return {
        "cls": cls,
        "logits": logits,
        "label": labels,
        "mask": mask,
        "id": np.array([f"img{seed}_{i}" for i in range(n)]),
    }

  data = {"train": split(60, 1), "test": split(20, 2)}
  plots = []
  ctx = types.SimpleNamespace(
      features=data.__getitem__,
      out_dir=str(tmp_path),
      add_plot=plots.append,
      mesh=None,
      step=0,
      num_classes=4,
  )
  got = retrieval.run(ctx, ks=(1, 10, 100), code_lengths=(32, 16))
  assert "map@100" not in got  # Above the 58 database rows.
  assert got["num_queries"] == 18 and got["num_database"] == 58
  assert 0 < got["map_all"] <= 1 and 0 < got["codes/32/map_all"] <= 1
  assert {"asym/16/map_all", "codes/random16/map@10"} <= set(got)
  assert all(isinstance(v, float) for v in got.values())
  assert sorted(os.path.basename(p) for p in plots) == [
      "retrieval_map_vs_bits.png",
      "retrieval_precision.png",
  ]
  # The full message is scored even when `code_lengths` leaves it out (a 1024-bit head with
  # the default lengths used to crash the precision plot: no 'codes/1024/' entries).
  shorter = retrieval.run(ctx, ks=(1, 10), code_lengths=(16,), random_subsets=False)
  assert shorter["codes/32/map_all"] == pytest.approx(got["codes/32/map_all"])
  assert {k for k in shorter if k.startswith("codes/") and k.endswith("/map_all")} == {
      "codes/32/map_all",
      "codes/16/map_all",
  }
  # A head wider than max_bits: a BITS head is still a message, another head is not.
  ctx.out_dir = None
  ctx.config = ml_collections.ConfigDict({"objective": {"name": "bits"}})
  wide = retrieval.run(ctx, ks=(1,), code_lengths=(), random_subsets=False, max_bits=16)
  assert wide["codes/32/map_all"] == pytest.approx(got["codes/32/map_all"])
  ctx.config.objective.name = "dino"
  prototypes = retrieval.run(ctx, ks=(1,), code_lengths=(), random_subsets=False, max_bits=16)
  assert prototypes["map_all"] == got["map_all"]
  assert not any(k.startswith(("codes/", "asym/")) for k in prototypes)
  # A split file selects the queries; the same split as database leaves each query out.
  ids = tmp_path / "queries.txt"
  ids.write_text("# queries\nimg1_3 0\n\nimg1_7\n")
  ctx.out_dir = None
  own = retrieval.run(
      ctx,
      query_split="train",
      database_split="train",
      query_split_file=str(ids),
      ks=(1,),
      codes=False,
  )
  assert own["num_queries"] == 2 and own["num_database"] == 58
  ids.write_text("img1_3\nimg1_59\n")  # Row 59 is padding (mask False).
  with pytest.raises(ValueError, match="img1_59"):
    retrieval.run(ctx, query_split="train", query_split_file=str(ids), codes=False)
