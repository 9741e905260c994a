"""Exact metrics of full rankings: AP@ALL, AP@k and precision@k, memory-bounded and sharded.

Every query ranks the whole database, best score first. With rel_i = 1 when the item at rank i
is relevant, hits_i = rel_1 + ... + rel_i and R the query's relevant items in the database:
  AP@ALL = (1/R) sum_i rel_i hits_i / i
  AP@k   = (1/min(R, k)) sum_{i<=k} rel_i hits_i / i
  P@k    = hits_k / k
A query with R = 0 scores 0 (it still counts in the mean; `queries_without_relevant` says how
many there were). Relevant: the same class id (labels [n] int), or at least one class in common
(multi-hot labels [n, C]).

Ties: items with equal scores (bit-identical float32 similarities, equal Hamming distances) form
a group, and each metric is its expected value over all orders of every group, equally likely
(McSherry & Najork, ECIR 2008). A group at ranks c0+1 .. c0+n with r relevant items and h0 hits
before it gives rank c0+p the AP term (r/n) (h0 + 1 + (p-1)(r-1)/(n-1)) / (c0+p) and
E[hits_{c0+p}] = h0 + p r / n. Without ties this is plain AP. Unlike "ties by index" it does not
depend on how the database is stored, and it lets Hamming retrieval work from histograms of
distances without sorting. (scikit-learn's average_precision_score gives every relevant item
of a group the precision at the group's end instead; the two agree when nothing ties.)

Two kernels, both sharding the queries over every device of a mesh (database replicated):
  scored: float32 scores q . x of any prepared vectors (cosine, asymmetric codes), then one
    sort per query of uint32 keys; a block of queries x the whole database is the largest
    array, so queries are processed `max_elements // ndb` per device at a time.
  hamming: XOR + popcount distances in database blocks, accumulated into per-query histograms
    [bits + 1, 2] (count of irrelevant / relevant items per distance) for several code variants
    in one pass; the metrics follow from the histograms in float64 (digamma sums, ~1e-9).
"""

from concurrent import futures
import functools
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from scipy import special

from bits_jax import utils

WORD_BITS = 32
# Sorted after every real key (whose score is within [-1.5, 1.5]); bit 0 clear: not relevant.
_EXCLUDED = np.uint32(0xFFFFFFFE)
DEFAULT_MAX_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------- inputs


def pack_rows(bits) -> np.ndarray:
  """Packs bits [n, b] (bool or 0/1) into uint32 words [n, ceil(b / 32)], bit j in word j // 32
  at position j % 32 (the layout of retrieval.pack_bits), zero-padded."""
  bits = np.asarray(bits).astype(bool)
  packed = np.packbits(bits, axis=1, bitorder="little")
  n_words = -(-bits.shape[1] // WORD_BITS)
  packed = np.pad(packed, ((0, 0), (0, 4 * n_words - packed.shape[1])))
  return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def prepare_labels(labels, name: str) -> tuple[np.ndarray, bool]:
  """(labels as int32 [n] or packed multi-hot words [n, w], multi_label)."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    if not np.issubdtype(labels.dtype, np.integer):
      raise TypeError(
          f"{name} are [n] with dtype {labels.dtype}: pass integer class ids, or "
          "multi-hot [n, classes] for multi-label data."
      )
    return labels.astype(np.int32), False
  if labels.ndim == 2:
    return pack_rows(labels != 0), True
  raise ValueError(
      f"{name} must be class ids [n] or multi-hot [n, classes], got shape {labels.shape}."
  )


def self_relevant(labels: np.ndarray, multi: bool) -> np.ndarray:
  """[n] bool: whether a row is relevant to itself (always, unless it has no label)."""
  return labels.any(axis=1) if multi else np.ones(labels.shape[0], bool)


def _relevance(q_labels, db_labels, multi: bool) -> jax.Array:
  """[b, m] bool from labels [b] / [m] or packed multi-hot [b, w] / [m, w]."""
  if not multi:
    return q_labels[:, None] == db_labels[None, :]
  rel = jnp.zeros((q_labels.shape[0], db_labels.shape[0]), bool)
  for w in range(q_labels.shape[1]):
    rel |= (q_labels[:, None, w] & db_labels[None, :, w]) != 0
  return rel


def _put(x: np.ndarray, sharding: Optional[NamedSharding]) -> jax.Array:
  if sharding is None:
    return jnp.asarray(x)
  # Works on one or many hosts, as long as every host holds the full array.
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  return np.concatenate([x, np.repeat(x[:1], n - x.shape[0], axis=0)])


def _over_queries(fn, mesh: Optional[Mesh], n_sharded: int, n_replicated: int):
  """fn(*query_args, *database_args) with the query args split over all devices of `mesh`."""
  if mesh is None:
    return fn
  axes = tuple(mesh.axis_names)
  return jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(P(axes),) * n_sharded + (P(),) * n_replicated,
      out_specs=P(axes),
      check_vma=False,
  )


# ------------------------------------------------------------------- sorted keys -> AP terms


def order_keys(scores, rel) -> jax.Array:
  """uint32 keys whose ascending order is descending score, with relevance in bit 0.

  Exact: |scores| < 2 leaves bit 30 of a float32 clear, so the remaining 31 bits map to an
  order-preserving integer and bit 0 is free. Scores are clipped to [-1.5, 1.5] (a no-op for
  cosine similarities and the scaled asymmetric scores of this module); -0.0 counts as 0.0.
  """
  s = jnp.clip(scores.astype(jnp.float32), -1.5, 1.5)
  s = jnp.where(s == 0, jnp.float32(0), s)
  u = jax.lax.bitcast_convert_type(s, jnp.uint32)
  mag = u & jnp.uint32(0x7FFFFFFF)
  ascending = jnp.where(u >> 31 == 1, jnp.uint32(0x3FFFFFFF) - mag, jnp.uint32(0x40000000) + mag)
  return ((jnp.uint32(0x7FFFFFFF) - ascending) << 1) | rel.astype(jnp.uint32)


# Tie groups of at most this many ranks (all of them, in practice, for float32 scores) find
# their bounds by shifted compares; a block holding a longer one takes four full-row scans.
SHORT_TIE_GROUP = 8


def sorted_sums(keys, ks: tuple[int, ...], short_group: int = SHORT_TIE_GROUP) -> jax.Array:
  """Per-query sums from sorted keys.

  Args:
    keys: [b, n] uint32 from order_keys, sorted ascending along axis 1.
    ks: cut-offs (<= n).
    short_group: tie groups up to this size are bounded by shifted compares, longer ones by
      scans (the same numbers; the sums of a block took 1.7x longer with scans on a CPU).

  Returns:
    [b, 2 + 2 len(ks)] float32: R, the AP sum over all ranks, the AP sums over the first k
    ranks, then E[hits_k] for each k (see the module docstring for the tie expectation).
  """
  b, n = keys.shape
  rel = (keys & 1).astype(jnp.int32)
  hits = jnp.cumsum(rel, axis=1, dtype=jnp.int32)
  rank = jnp.arange(1, n + 1, dtype=jnp.float32)
  score = keys >> 1
  new_score = score[:, 1:] != score[:, :-1]

  def untied():
    return hits.astype(jnp.float32), jnp.where(rel > 0, hits / rank, 0.0)

  def tied():
    true = jnp.ones((b, 1), bool)
    is_start = jnp.concatenate([true, new_score], axis=1)
    is_end = jnp.concatenate([new_score, true], axis=1)
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    bounds, too_long = _short_tie_bounds(is_start, is_end, hits, rel, short_group)
    start, end, h0, h_end = jax.lax.cond(
        too_long, lambda: _scanned_tie_bounds(is_start, is_end, hits, rel), lambda: bounds
    )
    size = (end - start + 1).astype(jnp.float32)
    r = (h_end - h0).astype(jnp.float32)
    p = (idx - start + 1).astype(jnp.float32)
    frac = r / size
    rho = jnp.where(size > 1, (r - 1) / jnp.maximum(size - 1, 1), 0.0)
    contrib = frac * (h0 + 1 + (p - 1) * rho) / rank
    return h0 + p * frac, contrib

  ehits, contrib = jax.lax.cond(jnp.any(~new_score), tied, untied)
  cols = [hits[:, -1].astype(jnp.float32), jnp.sum(contrib, axis=1)]
  cols += [jnp.sum(contrib[:, :k], axis=1) for k in ks]
  cols += [ehits[:, k - 1] for k in ks]
  return jnp.stack(cols, axis=1)


def _scanned_tie_bounds(is_start, is_end, hits, rel):
  """(start, end, h0, h_end) [b, n] int32 of each rank's tie group, by running max / min.

  start, end: the group's first and last index; h0: hits before it; h_end: hits at its end.
  """
  b, n = hits.shape
  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
  end = jax.lax.cummin(jnp.where(is_end, idx, n - 1), axis=1, reverse=True)
  # hits - rel and hits are non-decreasing: a running max/min carries the group's value.
  h0 = jax.lax.cummax(jnp.where(is_start, hits - rel, 0), axis=1)
  h_end = jax.lax.cummin(jnp.where(is_end, hits, jnp.iinfo(jnp.int32).max), axis=1, reverse=True)
  return start, end, h0, h_end


def _short_tie_bounds(is_start, is_end, hits, rel, group: int):
  """`_scanned_tie_bounds` for groups of at most `group` ranks, looking at most group - 1
  places back and ahead; and whether some group of these rows is longer (bool [])."""
  b, n = hits.shape

  def shifted(x, d):  # x[:, i + d] at i (zero-filled outside the row)
    pad = jnp.zeros((b, min(abs(d), n)), x.dtype)
    if d > 0:
      return jnp.concatenate([x[:, d:], pad], axis=1)
    return jnp.concatenate([pad, x[:, : max(n + d, 0)]], axis=1)

  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  before = hits - rel
  start, h0, back = idx, before, ~is_start  # back: ranks i - d + 1 .. i all tie backwards
  end, h_end, ahead = idx, hits, ~is_end
  for d in range(1, max(group, 1)):
    start = jnp.where(back, idx - d, start)
    h0 = jnp.where(back, shifted(before, -d), h0)
    back &= shifted(~is_start, -d)
    end = jnp.where(ahead, idx + d, end)
    h_end = jnp.where(ahead, shifted(hits, d), h_end)
    ahead &= shifted(~is_end, d)
  # A rank still tying back after group - 1 steps sits in a group longer than `group`.
  return (start, end, h0, h_end), jnp.any(back)


# ------------------------------------------------------------------------ scored (sort) path


def _numpy_sort_rows(keys: np.ndarray) -> np.ndarray:
  """np.sort along the last axis, the rows split over the host's cores (it frees the GIL)."""
  keys = np.asarray(keys)
  parts = min(os.cpu_count() or 1, len(keys))
  if parts < 2:
    return np.sort(keys, axis=-1)
  with futures.ThreadPoolExecutor(parts) as pool:
    return np.concatenate(list(pool.map(np.sort, np.array_split(keys, parts))))


def sort_rows(keys: jax.Array, on_cpu: bool) -> jax.Array:
  """keys [b, n] uint32 sorted along axis 1. XLA's CPU sort calls its comparator per pair:
  numpy's SIMD sort of a [512, 60k] block took 0.14 s on two cores against 1.26 s."""
  if not on_cpu:
    return jnp.sort(keys, axis=1)
  return jax.pure_callback(
      _numpy_sort_rows, jax.ShapeDtypeStruct(keys.shape, keys.dtype), keys, vmap_method="sequential"
  )


@functools.partial(jax.jit, static_argnames=("ks", "multi", "mesh"))
def _scored_block(q, q_labels, q_self, database, db_labels, *, ks, multi, mesh):
  on_cpu = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform == "cpu"

  def local(q, q_labels, q_self, database, db_labels):
    scores = jnp.matmul(q, database.T, precision=jax.lax.Precision.HIGHEST)
    keys = order_keys(scores, _relevance(q_labels, db_labels, multi))
    idx = jnp.arange(database.shape[0], dtype=jnp.int32)
    keys = jnp.where(idx[None, :] == q_self[:, None], _EXCLUDED, keys)
    return sorted_sums(sort_rows(keys, on_cpu), ks)

  return _over_queries(local, mesh, 3, 2)(q, q_labels, q_self, database, db_labels)


def scored_sums(
    queries,
    query_labels,
    database,
    db_labels,
    *,
    ks: Sequence[int],
    query_self=None,
    mesh: Optional[Mesh] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
  """Per-query sums for rankings by the score q . x (higher first).

  Args:
    queries: [nq, d] float32, prepared so that q . x is the score (|score| <= 1.5).
    query_labels: [nq] int32 or packed multi-hot [nq, w] (prepare_labels).
    database: [ndb, d] float32.
    db_labels: [ndb] or [ndb, w], as query_labels.
    ks: cut-offs, each <= ndb (minus one when a query excludes itself).
    query_self: optional [nq] int; the database row of each query, left out of its ranking
      (-1: none).
    mesh: queries are split over all its devices; the database is replicated on each.
    max_elements: bound on queries x ndb per device and block (memory ~ 30 bytes each).

  Returns:
    [nq, 2 + 2 len(ks)] float64, columns as in sorted_sums.
  """
  queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)
  q_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
  nq, ndb = queries.shape[0], database.shape[0]
  q_self = np.full(nq, -1, np.int32) if query_self is None else np.asarray(query_self, np.int32)
  multi = q_labels.ndim == 2
  devices = 1 if mesh is None else mesh.devices.size
  per_device = max(1, min(max_elements // max(ndb, 1), -(-nq // devices)))
  block = per_device * devices
  q_sharding = db_sharding = None
  if mesh is not None:
    q_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    db_sharding = NamedSharding(mesh, P())
  database, db_labels = _put(database, db_sharding), _put(db_labels, db_sharding)
  out = []
  for start in range(0, nq, block):
    stop = min(start + block, nq)
    args = [_put(_pad_rows(x[start:stop], block), q_sharding) for x in (queries, q_labels, q_self)]
    sums = _scored_block(*args, database, db_labels, ks=tuple(ks), multi=multi, mesh=mesh)
    out.append(utils.to_host(sums)[: stop - start].astype(np.float64))
  return np.concatenate(out)


# ---------------------------------------------------------------------- hamming (histograms)


def _variant_distances(q_words, block_t, variants):
  """Distances [b, m] uint16 of each variant (start_word, n_words, n_bits); variants that
  share a start word share the running popcount sum of its words."""
  dists = {}
  for start in sorted({v[0] for v in variants}):
    lengths = {v[1] for v in variants if v[0] == start}
    acc = jnp.zeros((q_words.shape[0], block_t.shape[1]), jnp.uint16)
    for i in range(max(lengths)):
      w = start + i
      acc = acc + jax.lax.population_count(q_words[:, w, None] ^ block_t[None, w, :]).astype(
          jnp.uint16
      )
      if i + 1 in lengths:
        dists[(start, i + 1)] = acc
  return [dists[(v[0], v[1])] for v in variants]


@functools.partial(jax.jit, static_argnames=("variants", "multi", "db_block", "n_valid", "mesh"))
def _hamming_block(
    q_words, q_labels, db_words, db_labels, *, variants, multi, db_block, n_valid, mesh
):
  def local(q_words, q_labels, db_words, db_labels):
    b, n_words = q_words.shape
    n_blocks = db_words.shape[0] // db_block
    blocks = db_words.T.reshape(n_words, n_blocks, db_block).transpose(1, 0, 2)
    lab_blocks = db_labels.reshape((n_blocks, db_block) + db_labels.shape[1:])
    sizes = [2 * (v[2] + 1) for v in variants]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]

    def step(hists, xs):
      block_t, labels, offset = xs
      rel = _relevance(q_labels, labels, multi).astype(jnp.int32)
      valid = (offset + jnp.arange(db_block, dtype=jnp.int32) < n_valid)[None, :]
      new = []
      for hist, size, dist in zip(hists, sizes, _variant_distances(q_words, block_t, variants)):
        index = rows * size + 2 * dist.astype(jnp.int32) + rel
        index = jnp.where(valid, index, b * size)  # Padding rows land in a spare last bin.
        new.append(hist.at[index.reshape(-1)].add(1, mode="promise_in_bounds"))
      return tuple(new), None

    init = tuple(jnp.zeros(b * size + 1, jnp.int32) for size in sizes)
    offsets = jnp.arange(n_blocks, dtype=jnp.int32) * db_block
    hists, _ = jax.lax.scan(step, init, (blocks, lab_blocks, offsets))
    return tuple(h[:-1].reshape(b, v[2] + 1, 2) for h, v in zip(hists, variants))

  return _over_queries(local, mesh, 2, 2)(q_words, q_labels, db_words, db_labels)


def hamming_histograms(
    query_words,
    query_labels,
    db_words,
    db_labels,
    *,
    variants: Sequence[tuple[int, int, int]],
    query_self=None,
    self_rel=None,
    mesh: Optional[Mesh] = None,
    query_block: int = 256,
    db_block: int = 16384,
) -> list[np.ndarray]:
  """Per-query histograms of Hamming distance and relevance, for several code variants.

  Args:
    query_words: [nq, W] uint32 packed codes; a variant reads words [start, start + n).
    query_labels: [nq] int32 or packed multi-hot [nq, w].
    db_words: [ndb, W] uint32; db_labels as query_labels.
    variants: (start_word, n_words, n_bits) per variant; unused bits of its words are zero.
    query_self: optional [nq] int database row of each query (-1: none), removed from the
      histograms (its distance to itself is 0).
    self_rel: [nq] bool, whether that row is relevant to its query (needed with query_self).
    mesh: queries are split over all its devices; the codes are replicated on each.
    query_block: queries per device and block.
    db_block: database rows per distance block (memory ~ query_block x db_block x 12 bytes).

  Returns:
    One int64 array [nq, n_bits + 1, 2] per variant: [q, d, 0] irrelevant and [q, d, 1]
    relevant database items at distance d from query q.
  """
  q_words, db_words = np.asarray(query_words, np.uint32), np.asarray(db_words, np.uint32)
  q_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
  nq, ndb = q_words.shape[0], db_words.shape[0]
  devices = 1 if mesh is None else mesh.devices.size
  per_device = max(1, min(query_block, -(-nq // devices)))
  block = per_device * devices
  db_block = max(1, min(db_block, ndb))
  n_pad = db_block * math.ceil(ndb / db_block)
  q_sharding = db_sharding = None
  if mesh is not None:
    q_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    db_sharding = NamedSharding(mesh, P())
  db_w = _put(np.pad(db_words, ((0, n_pad - ndb), (0, 0))), db_sharding)
  db_l = _put(
      np.pad(db_labels, ((0, n_pad - ndb),) + ((0, 0),) * (db_labels.ndim - 1)), db_sharding
  )
  variants = tuple(tuple(int(x) for x in v) for v in variants)
  out = [[] for _ in variants]
  for start in range(0, nq, block):
    stop = min(start + block, nq)
    hists = _hamming_block(
        _put(_pad_rows(q_words[start:stop], block), q_sharding),
        _put(_pad_rows(q_labels[start:stop], block), q_sharding),
        db_w,
        db_l,
        variants=variants,
        multi=q_labels.ndim == 2,
        db_block=db_block,
        n_valid=ndb,
        mesh=mesh,
    )
    for parts, hist in zip(out, hists):
      parts.append(utils.to_host(hist)[: stop - start].astype(np.int64))
  out = [np.concatenate(parts) for parts in out]
  if query_self is not None:
    query_self = np.asarray(query_self)
    rows = np.flatnonzero(query_self >= 0)
    rel = np.asarray(self_rel, bool)[rows].astype(int)
    for hist in out:
      hist[rows, 0, rel] -= 1
  return out


def _group_terms(m, n, r, c0, h0):
  """AP terms of the first m ranks of tie groups (size n, r relevant, c0 items and h0 hits
  before), float64: (r/n) [(h0 + 1) S0 + rho S1] with S0 = sum_p 1/(c0+p),
  S1 = sum_p (p-1)/(c0+p) over p = 1..m, rho = (r-1)/(n-1)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    frac = np.where(n > 0, r / np.maximum(n, 1), 0.0)
    rho = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    s0 = special.digamma(c0 + m + 1) - special.digamma(c0 + 1)
    s0 = np.where(m == 1, 1.0 / (c0 + 1), np.where(m > 0, s0, 0.0))
    s1 = np.where(m > 1, m - (c0 + 1) * s0, 0.0)
  return frac * ((h0 + 1) * s0 + rho * s1)


def histogram_sums(hist: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """Per-query sums (columns as in sorted_sums) from histograms [nq, bins, 2], float64."""
  count = hist.sum(axis=2).astype(np.float64)
  rel = hist[..., 1].astype(np.float64)
  c_end = np.cumsum(count, axis=1)
  c0 = c_end - count
  h_end = np.cumsum(rel, axis=1)
  h0 = h_end - rel
  full = _group_terms(count, count, rel, c0, h0)
  before = np.cumsum(full, axis=1) - full
  rows = np.arange(hist.shape[0])
  cols = [h_end[:, -1], full.sum(axis=1)]
  ap_k, hits_k = [], []
  for k in ks:
    g = np.argmax(c_end >= k, axis=1)  # The group holding rank k.
    m = k - c0[rows, g]
    n, r = count[rows, g], rel[rows, g]
    ap_k.append(before[rows, g] + _group_terms(m, n, r, c0[rows, g], h0[rows, g]))
    hits_k.append(h0[rows, g] + m * np.where(n > 0, r / np.maximum(n, 1), 0.0))
  return np.stack(cols + ap_k + hits_k, axis=1)


# ---------------------------------------------------------------------------------- metrics


def summarize(sums: np.ndarray, ks: Sequence[int], prefix: str = "") -> dict[str, float]:
  """Means over queries: {'map_all', 'map@k', 'precision@k', 'queries_without_relevant'}."""
  sums = np.asarray(sums, np.float64)
  n_k = len(ks)
  r = sums[:, 0]
  has = r > 0
  out = {prefix + "map_all": float(np.mean(np.where(has, sums[:, 1] / np.maximum(r, 1), 0)))}
  for i, k in enumerate(ks):
    ap = np.where(has, sums[:, 2 + i] / np.maximum(np.minimum(r, k), 1), 0)
    out[f"{prefix}map@{k}"] = float(np.mean(ap))
  for i, k in enumerate(ks):
    out[f"{prefix}precision@{k}"] = float(np.mean(sums[:, 2 + n_k + i] / k))
  out[prefix + "queries_without_relevant"] = float(np.sum(~has))
  return out
