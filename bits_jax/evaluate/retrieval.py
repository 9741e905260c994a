"""Retrieval: the paper's mAP@ALL protocol, and Hamming search with packed binary codes.

The paper's protocol (`feature_retrieval`, `code_retrieval`, the 'retrieval' evaluator): every
query of the query set ranks the whole database; AP@ALL, AP@k and precision@k with ties counted
at their expectation over orders (definitions in ranking.py). Continuous features rank by cosine
similarity; codes by symmetric Hamming distance (histograms, no sort) or by the asymmetric
distance of query probabilities to database bits, for the full code and sub-sampled codes.

The older top-k helpers (`hamming_retrieval`, `cosine_retrieval`, `hamming_topk`) break ties by
database index instead, and their map@R follows the DeepHash convention (averaged over the
relevant items within the top R).

Bit j of a code lives in word j // 32 at bit position j % 32 (LSB first);
codes are padded with zero bits, which XOR to zero and so never change a
distance. Hamming distances are XOR + popcount on uint32 words: no unpacked
float matmul.

Ranking (older helpers) follows the standard hashing protocol: every query ranks the whole
database by distance, ties broken by database index (lower first). Relevant
means sharing the class label (or, for multi-hot labels [n, c], sharing at
least one class). AP@R is averaged over the relevant items within the top R
and is 0 for a query with none there (the DeepHash convention); map@all ranks
the full database.
"""

import functools
import math
import os
from typing import Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bits_jax.evaluate import common
from bits_jax.evaluate import ranking
from bits_jax.evaluate import split_file

_WORD_BITS = 32
# Elements of one [queries, database] block: bounds the memory of a sort.
_BLOCK_ELEMENTS = 1 << 24


def binarize(logits) -> jax.Array:
  """The binary message: logits [n, b] -> bits [n, b] bool (logit > 0)."""
  return jnp.asarray(logits) > 0


@jax.jit
def pack_bits(bits) -> jax.Array:
  """Packs bits [n, b] (bool or 0/1) into words [n, ceil(b / 32)] uint32."""
  bits = jnp.asarray(bits).astype(jnp.uint32)
  n, b = bits.shape
  n_words = -(-b // _WORD_BITS)
  bits = jnp.pad(bits, ((0, 0), (0, n_words * _WORD_BITS - b)))
  bits = bits.reshape(n, n_words, _WORD_BITS)
  shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  # Bits are disjoint, so the sum is an OR.
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def _hamming_t(q_words: jax.Array, db_t: jax.Array) -> jax.Array:
  """Distances [nq, m] from [nq, w] and word-major [w, m] uint32 codes.

  Word-major keeps each word's column contiguous, and the accumulator is
  uint16 when the codes have fewer than 65536 bits: both roughly halve the
  time of this pass on CPU.
  """
  n_words = q_words.shape[1]
  acc = jnp.uint16 if _WORD_BITS * n_words < 65535 else jnp.int32
  dist = jnp.zeros((q_words.shape[0], db_t.shape[1]), acc)
  for w in range(n_words):  # Few words: unrolled, fused by XLA.
    xor = q_words[:, w, None] ^ db_t[None, w, :]
    dist += jax.lax.population_count(xor).astype(acc)
  return dist


@jax.jit
def hamming_distance(q_words, db_words) -> jax.Array:
  """Hamming distances between packed codes: [nq, w], [ndb, w] -> [nq, ndb]."""
  q_words, db_words = jnp.asarray(q_words), jnp.asarray(db_words)
  _check_words(q_words, db_words)
  return _hamming_t(q_words, db_words.T).astype(jnp.int32)


def smallest_k(values: jax.Array, k: int, *, group: int = 16) -> tuple[jax.Array, jax.Array]:
  """Exact k smallest entries of each row, ties broken by lower position.

  XLA's CPU top_k costs several ns per element, so rows are first cut into
  groups of `group`; only the k groups with the smallest (minimum, group
  index) can hold the answer (any other group is preceded by k groups whose
  minima all rank before its entries), so top_k runs on m / group minima and
  k * group candidates instead of m entries.

  Args:
    values: [n, m] numbers (integer values must be exact in float32).
    k: entries to keep, <= m.
    group: group size; the grouped path needs m % group == 0 and
      m / group > k, otherwise a plain top_k is used.

  Returns:
    (values [n, k] float32 ascending, positions [n, k] int32).
  """
  n, m = values.shape
  n_groups = m // group
  if m % group or n_groups <= k:
    neg, pos = jax.lax.top_k(-values.astype(jnp.float32), k)
    return -neg, pos
  grouped = values.reshape(n, n_groups, group)
  _, chosen = jax.lax.top_k(-grouped.min(axis=2).astype(jnp.float32), k)
  chosen = jnp.sort(chosen, axis=1)  # Candidates in position order: stable.
  cand = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1)
  neg, pick = jax.lax.top_k(-cand.reshape(n, k * group).astype(jnp.float32), k)
  pos = (chosen[:, :, None] * group + jnp.arange(group)).reshape(n, k * group)
  return -neg, jnp.take_along_axis(pos, pick, axis=1)


def _check_words(q_words, db_words):
  if q_words.dtype != jnp.uint32 or db_words.dtype != jnp.uint32:
    raise TypeError(
        "packed codes must be uint32 words from pack_bits, got "
        f"{q_words.dtype} and {db_words.dtype}."
    )
  if q_words.ndim != 2 or q_words.shape[1:] != db_words.shape[1:]:
    raise ValueError(
        f"packed code shapes {q_words.shape} and "
        f"{db_words.shape} do not match: pack both with the "
        "same number of bits."
    )


@functools.partial(jax.jit, static_argnames=("k", "db_block", "n_valid"))
def _hamming_topk_kernel(q_words, db_words, *, k, db_block, n_valid):
  """Top-k smallest distances, scanning the database in blocks."""
  nq, n_words = q_words.shape
  n_blocks = db_words.shape[0] // db_block
  # [n_blocks, w, db_block]: word-major blocks for _hamming_t.
  blocks = db_words.T.reshape(n_words, n_blocks, db_block).transpose(1, 0, 2)

  def step(carry, xs):
    best, best_idx = carry
    block, offset = xs
    idx = offset + jnp.arange(db_block, dtype=jnp.int32)
    # Kept in the narrow accumulator dtype: smallest_k converts only group
    # minima and candidates to float32 (exact: distances < 2^24), which is
    # ~3x faster on CPU than converting the whole block.
    dist = _hamming_t(q_words, block)
    padding = jnp.iinfo(dist.dtype).max  # Above any real distance.
    dist = jnp.where(idx[None, :] < n_valid, dist, padding)
    dist_k, pos = smallest_k(dist, min(k, db_block))
    # Running candidates come first and have lower indices: ties keep order.
    dist = jnp.concatenate([best, dist_k], axis=1)
    idx = jnp.concatenate([best_idx, offset + pos], axis=1)
    best, pos = smallest_k(dist, k)
    return (best, jnp.take_along_axis(idx, pos, axis=1)), None

  init = (jnp.full((nq, k), jnp.inf, jnp.float32), jnp.zeros((nq, k), jnp.int32))
  offsets = jnp.arange(n_blocks, dtype=jnp.int32) * db_block
  (best, best_idx), _ = jax.lax.scan(step, init, (blocks, offsets))
  return best.astype(jnp.int32), best_idx


def hamming_topk(
    q_words, db_words, k: int, *, db_block: int = 65536
) -> tuple[jax.Array, jax.Array]:
  """Exact k nearest database codes per query, ties broken by lower index.

  Args:
    q_words: [nq, w] uint32 packed query codes.
    db_words: [ndb, w] uint32 packed database codes.
    k: neighbours per query (<= ndb).
    db_block: database rows per distance block (bounds memory to nq x block).

  Returns:
    (distances [nq, k] int32 ascending, indices [nq, k] int32).
  """
  q_words, db_words = jnp.asarray(q_words), jnp.asarray(db_words)
  _check_words(q_words, db_words)
  ndb = db_words.shape[0]
  if not 1 <= k <= ndb:
    raise ValueError(f"k={k} must be in [1, {ndb}] (the database size).")
  db_block = min(db_block, ndb)
  n_pad = db_block * math.ceil(ndb / db_block)
  if n_pad != ndb:  # Padding rows are masked out inside the kernel.
    db_words = jnp.pad(db_words, ((0, n_pad - ndb), (0, 0)))
  return _hamming_topk_kernel(q_words, db_words, k=k, db_block=db_block, n_valid=ndb)


@jax.jit
def _relevance(q_labels: jax.Array, db_labels: jax.Array) -> jax.Array:
  if q_labels.ndim == 1:
    return q_labels[:, None] == db_labels[None, :]
  return jnp.matmul(q_labels.astype(jnp.float32), db_labels.astype(jnp.float32).T) > 0


@functools.partial(jax.jit, static_argnames=("depth", "map_at", "precision_at", "radius"))
def _block_metrics(dist, rel, *, depth, map_at, precision_at, radius):
  """Per-query metrics [b, m] from distances and relevance [b, ndb].

  depth is how many ranks are needed (ndb for map@all): a stable full sort
  when it is ndb, an exact top-k otherwise; both break ties by index.
  """
  ndb = dist.shape[1]
  if depth == ndb:
    order = jnp.argsort(dist, axis=1, stable=True)
  else:
    _, order = smallest_k(dist, depth)
  rel_sorted = jnp.take_along_axis(rel, order, axis=1)
  hits = jnp.cumsum(rel_sorted, axis=1, dtype=jnp.int32)
  ranks = jnp.arange(1, depth + 1, dtype=jnp.float32)
  # Precision at each relevant rank; summed (not cumsummed) per cut-off to
  # keep float32 error small over a million ranks.
  contrib = jnp.where(rel_sorted, hits / ranks, 0.0)
  columns = []
  for r in map_at:
    n_rel = hits[:, r - 1]
    ap = jnp.sum(contrib[:, :r], axis=1) / jnp.maximum(n_rel, 1)
    columns.append(jnp.where(n_rel > 0, ap, 0.0))
  for k in precision_at:
    columns.append(hits[:, k - 1] / k)
  if radius is not None:
    within = dist <= radius
    n_within = jnp.sum(within, axis=1)
    n_hit = jnp.sum(within & rel, axis=1)
    columns.append(jnp.where(n_within > 0, n_hit / jnp.maximum(n_within, 1), 0.0))
  return jnp.stack(columns, axis=1)


@jax.jit
def _cosine_distance(q, db):
  def normalize(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))

  return -jnp.matmul(normalize(q), normalize(db).T, precision=jax.lax.Precision.HIGHEST)


def _retrieval(
    distance_fn,
    queries,
    query_labels,
    database,
    db_labels,
    *,
    map_at,
    precision_at,
    radius,
    block_size,
):
  """Shared driver: blocks of queries against the whole database.

  distance_fn(query block, database) -> [b, ndb]; the database layout is
  whatever distance_fn takes, ndb comes from db_labels.
  """
  query_labels = jnp.asarray(query_labels)
  db_labels = jnp.asarray(db_labels)
  nq, ndb = queries.shape[0], db_labels.shape[0]
  if query_labels.shape[0] != nq or db_labels.shape[0] != ndb:
    raise ValueError(
        f"labels ({query_labels.shape}, {db_labels.shape}) must "
        f"have one row per query ({nq}) and database item ({ndb})."
    )
  if query_labels.ndim != db_labels.ndim or query_labels.ndim not in (1, 2):
    raise ValueError(
        "labels must be class ids [n] or multi-hot [n, c] for both queries and database."
    )
  if nq == 0:
    raise ValueError("no queries given.")
  map_names = ["all" if r is None else str(r) for r in map_at]
  map_r = tuple(ndb if r is None else min(int(r), ndb) for r in map_at)
  precision_at = tuple(int(k) for k in precision_at)
  if any(k < 1 or k > ndb for k in precision_at):
    raise ValueError(
        f"precision_at {precision_at} must lie in [1, {ndb}] "
        "(the database size): drop the larger cut-offs."
    )
  if any(r < 1 for r in map_r):
    raise ValueError(f"map_at {map_at} must be positive or None (all).")
  depth = max(map_r + precision_at)
  if block_size is None:
    block_size = max(1, min(nq, _BLOCK_ELEMENTS // max(ndb, 1)))
  block_size = min(block_size, nq)

  totals = None
  for start in range(0, nq, block_size):
    q = queries[start : start + block_size]
    ql = query_labels[start : start + block_size]
    n_real = q.shape[0]
    if n_real < block_size:  # Pad to the static block shape; dropped below.
      q = jnp.concatenate([q, jnp.repeat(q[:1], block_size - n_real, 0)])
      ql = jnp.concatenate([ql, jnp.repeat(ql[:1], block_size - n_real, 0)])
    metrics = _block_metrics(
        distance_fn(q, database),
        _relevance(ql, db_labels),
        depth=depth,
        map_at=map_r,
        precision_at=precision_at,
        radius=radius,
    )
    block_sum = np.asarray(metrics[:n_real], np.float64).sum(axis=0)
    totals = block_sum if totals is None else totals + block_sum
  totals /= nq
  names = [f"map@{n}" for n in map_names]
  names += [f"precision@{k}" for k in precision_at]
  if radius is not None:
    names.append(f"precision_r{radius}")
  return {name: float(v) for name, v in zip(names, totals)}


def hamming_retrieval(
    query_bits,
    query_labels,
    db_bits,
    db_labels,
    *,
    map_at: Sequence[Optional[int]] = (None, 1000),
    precision_at: Sequence[int] = (1, 10, 100, 1000),
    radius: Optional[int] = 2,
    block_size: Optional[int] = None,
) -> dict[str, float]:
  """Hashing-protocol retrieval metrics with binary codes.

  Args:
    query_bits: [nq, b] bool codes (e.g. binarize(logits)) or packed [nq, w]
      uint32 words.
    query_labels: [nq] class ids or [nq, c] multi-hot.
    db_bits: [ndb, b] bool codes or packed [ndb, w] uint32.
    db_labels: [ndb] class ids or [ndb, c] multi-hot.
    map_at: cut-offs R for mAP@R; None ranks the whole database. R larger
      than the database is clipped to it.
    precision_at: cut-offs k for precision@k (<= ndb).
    radius: also report precision within this Hamming radius (None: skip).
    block_size: queries per block; default keeps a block near 16M pairs.

  Returns:
    {'map@all', 'map@1000', 'precision@k'..., 'precision_r2'}: floats.
  """
  queries = _as_words(query_bits, "query_bits")
  database = _as_words(db_bits, "db_bits")
  _check_words(queries, database)
  return _retrieval(
      _hamming_jit,
      queries,
      query_labels,
      database.T,
      db_labels,
      map_at=tuple(map_at),
      precision_at=tuple(precision_at),
      radius=radius,
      block_size=block_size,
  )


def cosine_retrieval(
    query_feats,
    query_labels,
    db_feats,
    db_labels,
    *,
    map_at: Sequence[Optional[int]] = (None, 1000),
    precision_at: Sequence[int] = (1, 10, 100, 1000),
    block_size: Optional[int] = None,
) -> dict[str, float]:
  """The same protocol ranking by cosine similarity of continuous features.

  Args:
    query_feats: [nq, d]; db_feats: [ndb, d]; labels and cut-offs as in
      hamming_retrieval.

  Returns:
    {'map@all', 'map@1000', 'precision@k'...}: floats.
  """
  queries, database = jnp.asarray(query_feats), jnp.asarray(db_feats)
  if queries.ndim != 2 or queries.shape[1:] != database.shape[1:]:
    raise ValueError(
        f"feature shapes {queries.shape} and {database.shape} must be [n, d] with the same d."
    )
  return _retrieval(
      _cosine_distance,
      queries,
      query_labels,
      database,
      db_labels,
      map_at=tuple(map_at),
      precision_at=tuple(precision_at),
      radius=None,
      block_size=block_size,
  )


_hamming_jit = jax.jit(_hamming_t)


def _as_words(codes, name: str) -> jax.Array:
  codes = jnp.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"{name} must be [n, bits] or packed [n, words], got shape {codes.shape}.")
  if codes.dtype == jnp.uint32:
    return codes
  if codes.dtype != jnp.bool_:
    raise TypeError(
        f"{name} has dtype {codes.dtype}: pass bool bits "
        "(binarize(logits)) or uint32 words (pack_bits)."
    )
  return pack_bits(codes)


# ------------------------------------------------------------------ the paper's protocol


def _rows(mask, n: int, name: str) -> np.ndarray:
  if mask is None:
    return np.arange(n)
  mask = np.asarray(mask, bool)
  if mask.shape != (n,):
    raise ValueError(f"{name} must be [{n}] bool, got shape {mask.shape}.")
  return np.flatnonzero(mask)


class _Sets:
  """Queries and database after masks: labels prepared, self rows remapped.

  Attributes: q_rows, db_rows (kept rows of the inputs), q_labels, db_labels, multi,
  q_self ([nq] database position of each query's own row, -1: none, or None), self_rel,
  max_k (the largest valid cut-off).
  """

  def __init__(self, query_labels, db_labels, query_mask, db_mask, query_self):
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    nq, ndb = query_labels.shape[0], db_labels.shape[0]
    self.q_rows = _rows(query_mask, nq, "query_mask")
    self.db_rows = _rows(db_mask, ndb, "db_mask")
    if self.q_rows.size == 0 or self.db_rows.size == 0:
      raise ValueError(
          f"{len(self.q_rows)} queries and {len(self.db_rows)} database rows "
          "are left after the masks: both must be non-empty."
      )
    if query_labels.ndim != db_labels.ndim or query_labels.shape[1:] != db_labels.shape[1:]:
      raise ValueError(
          f"query labels {query_labels.shape} and database labels "
          f"{db_labels.shape} must both be class ids [n] or multi-hot with the "
          "same classes."
      )
    self.q_labels, self.multi = ranking.prepare_labels(query_labels[self.q_rows], "query_labels")
    self.db_labels, _ = ranking.prepare_labels(db_labels[self.db_rows], "db_labels")
    self.q_self = self.self_rel = None
    self.max_k = len(self.db_rows)
    if query_self is not None:
      query_self = np.asarray(query_self, np.int64)
      if query_self.shape != (nq,):
        raise ValueError(f"query_self must be [{nq}] database rows, got {query_self.shape}.")
      position = np.full(ndb + 1, -1, np.int64)  # position[-1] = -1 for "none".
      position[self.db_rows] = np.arange(len(self.db_rows))
      self.q_self = position[query_self[self.q_rows]].astype(np.int32)
      self.self_rel = ranking.self_relevant(self.q_labels, self.multi)
      if (self.q_self >= 0).any():
        self.max_k -= 1

  def check_ks(self, ks) -> tuple[int, ...]:
    """The cut-offs as ints, each checked against the database size."""
    ks = tuple(int(k) for k in ks)
    if any(k < 1 or k > self.max_k for k in ks):
      raise ValueError(
          f"cut-offs {ks} must lie in [1, {self.max_k}] (the database rows each "
          "query ranks): drop the larger ones."
      )
    return ks

  def info(self) -> dict[str, float]:
    """Sizes of the query set and the database."""
    return {"num_queries": float(len(self.q_rows)), "num_database": float(len(self.db_rows))}


def _finite(x: np.ndarray, name: str, rows: np.ndarray) -> np.ndarray:
  """float32 copy of the given rows of `x: [n, d]`, checked finite."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [n, d], got shape {x.shape}.")
  x = x[rows].astype(np.float32, copy=False)
  if not all(np.isfinite(x[i : i + 65536]).all() for i in range(0, len(x), 65536)):
    raise ValueError(f"{name} has non-finite values: the model produced NaN/inf features.")
  return x


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows of `x` scaled to unit norm, in place (x is a private copy)."""
  for start in range(0, len(x), 65536):  # Chunks: no second full-size temporary.
    block = x[start : start + 65536]
    block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
  return x


def feature_retrieval(
    query_feats,
    query_labels,
    db_feats,
    db_labels,
    *,
    ks: Sequence[int] = (1, 10, 100),
    query_mask=None,
    db_mask=None,
    query_self=None,
    mesh=None,
    max_elements: int = ranking.DEFAULT_MAX_ELEMENTS,
) -> dict[str, float]:
  """mAP@ALL, mAP@k and precision@k of cosine-similarity rankings, over all queries.

  Args:
    query_feats: [nq, d] continuous features (e.g. backbone CLS).
    query_labels: [nq] int class ids or [nq, C] multi-hot (relevant: a class in common).
    db_feats: [ndb, d]; db_labels: [ndb] or [ndb, C].
    ks: cut-offs for mAP@k (normalised by min(R, k)) and precision@k.
    query_mask, db_mask: optional bool; False rows (padding) are dropped.
    query_self: optional [nq] int, each query's own row in the database (-1: none), left out
      of its ranking (queries drawn from the database).
    mesh: queries are split over all its devices, the database replicated on each.
    max_elements: bound on queries x database per device and block.

  Returns:
    {'map_all', 'map@k', 'precision@k', 'queries_without_relevant', 'num_queries',
     'num_database'}: floats.
  """
  sets = _Sets(query_labels, db_labels, query_mask, db_mask, query_self)
  ks = sets.check_ks(ks)
  q = _l2_normalize(_finite(query_feats, "query_feats", sets.q_rows))
  db = _l2_normalize(_finite(db_feats, "db_feats", sets.db_rows))
  if q.shape[1] != db.shape[1]:
    raise ValueError(f"feature dims differ: queries {q.shape}, database {db.shape}.")
  sums = ranking.scored_sums(
      q,
      sets.q_labels,
      db,
      sets.db_labels,
      ks=ks,
      query_self=sets.q_self,
      mesh=mesh,
      max_elements=max_elements,
  )
  return {**ranking.summarize(sums, ks), **sets.info()}


def subsample_bits(num_bits: int, length: int, *, mode: str = "first", seed: int = 0) -> np.ndarray:
  """Indices [length] of the bits kept: the first `length`, or a sorted random subset."""
  if not 1 <= length <= num_bits:
    raise ValueError(f"code length {length} must lie in [1, {num_bits}] (the code's bits).")
  if mode == "first":
    return np.arange(length)
  if mode == "random":
    return np.sort(np.random.default_rng(seed).choice(num_bits, length, replace=False))
  raise ValueError(f"unknown sub-sampling mode {mode!r}: use 'first' or 'random'.")


def _code_variants(
    num_bits: int, code_lengths, random_subsets: bool, seed: int
) -> list[tuple[str, np.ndarray]]:
  """[(name, bit indices)]: '256' for the first 256 bits, 'random128' for a random subset.

  The full code always comes first, whatever `code_lengths` lists: it is the message itself
  (a 1024-bit head with the default lengths (256, ..., 32) is scored at 1024 bits too).
  """
  variants = [(str(num_bits), subsample_bits(num_bits, num_bits))]
  for i, length in enumerate(dict.fromkeys(int(x) for x in code_lengths)):
    if length == num_bits:
      continue
    if length > num_bits:
      logging.info(
          "retrieval: skipping code length %d > the %d bits of the code.", length, num_bits
      )
      continue
    variants.append((str(length), subsample_bits(num_bits, length)))
    if random_subsets:
      variants.append(
          (f"random{length}", subsample_bits(num_bits, length, mode="random", seed=seed + i))
      )
  return variants


def _asymmetric_vectors(probs, bits, subsets):
  """Vectors whose dot products are scaled asymmetric scores, one query block per subset.

  score_v(q, x) = -s sum_{k in v} |p_k - b_k| = s (2 p_v . b_v - sum p_v - |b_v|), with s a
  power of two (exact scaling) that brings scores into [-1, 0]. Database rows are
  [b (B), 1, |b_v| for each subset v]; query rows for subset v are
  [2 s p masked to v, -s sum p_v, -s at the column of |b_v|].

  Returns:
    (queries [V, nq, B + 1 + V], database [ndb, B + 1 + V]) float32.
  """
  probs, bits = np.asarray(probs, np.float32), np.asarray(bits, bool)
  nq, n_bits = probs.shape
  scale = np.float32(2.0 ** -math.ceil(math.log2(max(n_bits, 2))))
  n_v = len(subsets)
  database = np.zeros((bits.shape[0], n_bits + 1 + n_v), np.float32)
  database[:, :n_bits] = bits
  database[:, n_bits] = 1
  queries = np.zeros((n_v, nq, n_bits + 1 + n_v), np.float32)
  for v, idx in enumerate(subsets):
    database[:, n_bits + 1 + v] = bits[:, idx].sum(axis=1)
    queries[v][:, idx] = 2 * scale * probs[:, idx]
    queries[v][:, n_bits] = -scale * probs[:, idx].sum(axis=1, dtype=np.float32)
    queries[v][:, n_bits + 1 + v] = -scale
  return queries, database


def asymmetric_distance(query_probs, db_bits) -> np.ndarray:
  """sum_k |p_k - b_k|: [nq, B] probabilities vs [ndb, B] bits -> [nq, ndb] float32.

  For bits b in {0, 1} this equals the expected Hamming distance between b and a code drawn
  bit by bit from Bernoulli(p) (p (1 - b) + (1 - p) b = |p - b|). Computed as the ranking
  kernel computes it: one float32 dot product.
  """
  probs = np.asarray(query_probs, np.float32)
  queries, database = _asymmetric_vectors(probs, db_bits, [np.arange(probs.shape[1])])
  scale = 2.0 ** -math.ceil(math.log2(max(probs.shape[1], 2)))
  scores = jnp.matmul(queries[0], database.T, precision=jax.lax.Precision.HIGHEST)
  return np.asarray(-scores / scale)


def code_retrieval(
    query_logits,
    query_labels,
    db_logits,
    db_labels,
    *,
    ks: Sequence[int] = (1, 10, 100),
    code_lengths: Sequence[int] = (256, 128, 64, 32),
    random_subsets: bool = True,
    asymmetric: bool = True,
    seed: int = 0,
    query_mask=None,
    db_mask=None,
    query_self=None,
    mesh=None,
    max_elements: int = ranking.DEFAULT_MAX_ELEMENTS,
    query_block: int = 256,
    db_block: int = 16384,
) -> dict[str, float]:
  """mAP@ALL / mAP@k / precision@k with binary codes, for several code lengths in one pass.

  Codes are logits > 0. Symmetric: Hamming distance between query and database codes (all
  variants from one scan of the database, histograms, no sort). Asymmetric: sum_k |p_k - b_k|
  between query probabilities p = sigmoid(logits) and database bits (the expected Hamming
  distance; one sort per variant). Variants: the full code, the first L bits for each L in
  `code_lengths` (lengths above the code's bits are skipped) and, with `random_subsets`, a
  random L-bit subset (seed + position of L in code_lengths) for each L below the full length.

  Args:
    query_logits: [nq, B]; db_logits: [ndb, B]; labels, ks, masks, query_self, mesh,
      max_elements: as in feature_retrieval.
    query_block, db_block: Hamming-kernel block sizes (queries per device, database rows).

  Returns:
    {'codes/{v}/map_all', 'codes/{v}/map@k', 'codes/{v}/precision@k',
     'codes/{v}/queries_without_relevant', 'asym/{v}/...' (if asymmetric), 'codes/num_bits',
     'num_queries', 'num_database'} for each variant name v ('256', 'random128', ...).
  """
  sets = _Sets(query_labels, db_labels, query_mask, db_mask, query_self)
  ks = sets.check_ks(ks)
  q_logits = _finite(query_logits, "query_logits", sets.q_rows)
  db_bits = _finite(db_logits, "db_logits", sets.db_rows) > 0
  if q_logits.shape[1] != db_bits.shape[1]:
    raise ValueError(f"code lengths differ: queries {q_logits.shape}, database {db_bits.shape}.")
  n_bits = q_logits.shape[1]
  variants = _code_variants(n_bits, code_lengths, random_subsets, seed)
  q_bits = q_logits > 0

  # Packed words: the full code, then each variant that is not a whole-word prefix of it.
  q_words, db_words = [ranking.pack_rows(q_bits)], [ranking.pack_rows(db_bits)]
  layout, offset = [], q_words[0].shape[1]
  for _, idx in variants:
    length = len(idx)
    if length % ranking.WORD_BITS == 0 and np.array_equal(idx, np.arange(length)):
      layout.append((0, length // ranking.WORD_BITS, length))
      continue
    q_words.append(ranking.pack_rows(q_bits[:, idx]))
    db_words.append(ranking.pack_rows(db_bits[:, idx]))
    layout.append((offset, q_words[-1].shape[1], length))
    offset += q_words[-1].shape[1]
  hists = ranking.hamming_histograms(
      np.concatenate(q_words, 1),
      sets.q_labels,
      np.concatenate(db_words, 1),
      sets.db_labels,
      variants=layout,
      query_self=sets.q_self,
      self_rel=sets.self_rel,
      mesh=mesh,
      query_block=query_block,
      db_block=db_block,
  )
  out = {"codes/num_bits": float(n_bits), **sets.info()}
  for (name, _), hist in zip(variants, hists):
    out.update(ranking.summarize(ranking.histogram_sums(hist, ks), ks, f"codes/{name}/"))

  if asymmetric:
    probs = 1.0 / (1.0 + np.exp(-q_logits.astype(np.float64)))
    queries, database = _asymmetric_vectors(probs, db_bits, [idx for _, idx in variants])
    n_v, nq = queries.shape[:2]
    q_self = None if sets.q_self is None else np.tile(sets.q_self, n_v)
    sums = ranking.scored_sums(
        queries.reshape(n_v * nq, -1),
        np.concatenate([sets.q_labels] * n_v),
        database,
        sets.db_labels,
        ks=ks,
        query_self=q_self,
        mesh=mesh,
        max_elements=max_elements,
    )
    for v, (name, _) in enumerate(variants):
      out.update(ranking.summarize(sums[v * nq : (v + 1) * nq], ks, f"asym/{name}/"))
  return out


# -------------------------------------------------------------------------- the evaluator


def _split_rows(feats: dict, ids_file: Optional[str], classes_file: Optional[str], split: str):
  """Rows of a split to use: the valid rows, or those named in a split file, then (with a
  class list) those of the listed classes ('' or None: no selection)."""
  rows = np.flatnonzero(np.asarray(feats["mask"], bool))
  if not ids_file and not classes_file:
    return rows
  if "id" not in feats:
    raise ValueError(
        f"a split file or class list ({ids_file or classes_file}) needs image ids, but the "
        f"features of split {split!r} have no 'id': extract features with ids."
    )
  for path, select in (
      (ids_file, split_file.select_by_ids),
      (classes_file, split_file.select_by_classes),
  ):
    if path:
      try:
        rows = rows[select(np.asarray(feats["id"])[rows], split_file.read_split_file(path))]
      except ValueError as e:
        raise ValueError(f"{path} against split {split!r}: {e}") from e
  return rows


@common.register("retrieval")
def run(
    ctx,
    *,
    query_split: str = "test",
    database_split: str = "train",
    features: str = "cls",
    ks: Sequence[int] = (1, 10, 100),
    codes: bool = True,
    code_lengths: Sequence[int] = (256, 128, 64, 32),
    asymmetric: bool = True,
    random_subsets: bool = True,
    seed: int = 0,
    query_split_file: Optional[str] = None,
    database_split_file: Optional[str] = None,
    query_classes_file: Optional[str] = None,
    database_classes_file: Optional[str] = None,
    max_elements: int = ranking.DEFAULT_MAX_ELEMENTS,
    max_bits: int = 4096,
) -> dict[str, float]:
  """The paper's retrieval protocol on ctx's features: every query against the database.

  Queries are the valid rows of `query_split` (or those listed in `query_split_file`, one
  image id per line), the database those of `database_split` (or `database_split_file`);
  `query_classes_file` / `database_classes_file` (one class token per line, e.g. the WordNet
  ids of ImageNet100) keep the rows of those classes only (split_file.py). When both come
  from the same split, a query's own row is left out of its ranking. Cut-offs above the
  database size are dropped. Codes (logits > 0) are evaluated when `codes` is set and the
  weights have a BITS head (any width) or another head of at most `max_bits` outputs (not
  DINO's prototypes).

  Returns:
    {'map_all', 'map@k', 'precision@k', 'queries_without_relevant', 'num_queries',
     'num_database', 'codes/{v}/...', 'asym/{v}/...'} (see feature_retrieval and
    code_retrieval).
  """
  mesh = getattr(ctx, "mesh", None)
  q_feats = ctx.features(query_split)
  db_feats = ctx.features(database_split)
  q_rows = _split_rows(q_feats, query_split_file, query_classes_file, query_split)
  db_rows = _split_rows(db_feats, database_split_file, database_classes_file, database_split)
  query_self = None
  n_ranked = len(db_rows)
  if query_split == database_split:
    position = np.full(len(db_feats["mask"]), -1, np.int64)
    position[db_rows] = np.arange(len(db_rows))
    query_self = position[q_rows]
    n_ranked -= int((query_self >= 0).any())
  kept = tuple(int(k) for k in ks if int(k) <= n_ranked)
  if len(kept) < len(ks):
    logging.info(
        "retrieval: dropping cut-offs %s above the %d ranked database rows.",
        sorted(set(ks) - set(kept)),
        n_ranked,
    )
  if features not in q_feats:
    raise ValueError(
        f"features {features!r} are not extracted: use one of "
        f"{sorted(k for k in q_feats if k not in ('label', 'mask', 'id'))}."
    )
  results = feature_retrieval(
      q_feats[features][q_rows],
      q_feats["label"][q_rows],
      db_feats[features][db_rows],
      db_feats["label"][db_rows],
      ks=kept,
      query_self=query_self,
      mesh=mesh,
      max_elements=max_elements,
  )
  curves = {features: results}
  width = np.shape(q_feats["logits"])[1] if "logits" in q_feats else 0
  if codes and width and not common.head_is_message(ctx, width, max_bits):
    logging.warning(
        "retrieval: a head of %d outputs, not BITS's and wider than max_bits=%d, is not read "
        "as a binary code: codes skipped.",
        width,
        max_bits,
    )
  elif codes and "logits" in q_feats and "logits" in db_feats:
    results.update(
        code_retrieval(
            q_feats["logits"][q_rows],
            q_feats["label"][q_rows],
            db_feats["logits"][db_rows],
            db_feats["label"][db_rows],
            ks=kept,
            code_lengths=code_lengths,
            random_subsets=random_subsets,
            asymmetric=asymmetric,
            seed=seed,
            query_self=query_self,
            mesh=mesh,
            max_elements=max_elements,
        )
    )
    full = str(int(results["codes/num_bits"]))
    curves[f"hamming {full} bits"] = {
        k[len(f"codes/{full}/") :]: v for k, v in results.items() if k.startswith(f"codes/{full}/")
    }
  if ctx.out_dir is not None:
    from bits_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

    os.makedirs(ctx.out_dir, exist_ok=True)
    if kept:
      ctx.add_plot(
          plots.plot_precision_curve(curves, os.path.join(ctx.out_dir, "retrieval_precision.png"))
      )
    if "codes/num_bits" in results:
      ctx.add_plot(
          plots.plot_map_vs_bits(results, os.path.join(ctx.out_dir, "retrieval_map_vs_bits.png"))
      )
  return results
