"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalized; each query votes with its k most cosine-similar
bank rows, each neighbour weighted by exp(sim / temperature). Queries are
processed in fixed-size blocks and the bank in fixed-size chunks, so a
1.28M x 768 bank never becomes one similarity matrix. With a mesh the bank is
sharded over all devices: each device keeps its local top-k, then the
per-device candidates are gathered and merged.
"""
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

_NEG_INF = -jnp.inf


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


def _merge_topk(vals, labels, new_vals, new_labels, k):
  """Keeps the k largest of two candidate sets; earlier candidates win ties."""
  vals = jnp.concatenate([vals, new_vals], axis=1)
  labels = jnp.concatenate([labels, new_labels], axis=1)
  vals, idx = jax.lax.top_k(vals, k)
  return vals, jnp.take_along_axis(labels, idx, axis=1)


def _chunked_topk(queries, bank, bank_labels, bank_valid, *, k, chunk):
  """Top-k cosine neighbours of queries within one (local) bank.

  Args:
    queries: [b, d] L2-normalized.
    bank: [m, d] L2-normalized, m a multiple of chunk.
    bank_labels: [m] int32.
    bank_valid: [m] bool; invalid rows can never be neighbours.
    k: neighbours kept.
    chunk: bank rows per similarity block.

  Returns:
    (sims [b, k] descending, labels [b, k]); slots without a valid neighbour
    hold -inf.
  """
  b = queries.shape[0]
  n_chunks = bank.shape[0] // chunk
  bank = bank.reshape(n_chunks, chunk, -1)
  bank_labels = bank_labels.reshape(n_chunks, chunk)
  bank_valid = bank_valid.reshape(n_chunks, chunk)

  def step(carry, xs):
    chunk_feats, chunk_labels, chunk_valid = xs
    sims = jnp.matmul(queries, chunk_feats.T,
                      precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(chunk_valid[None, :], sims, _NEG_INF)
    new_labels = jnp.broadcast_to(chunk_labels[None, :], sims.shape)
    kk = min(k, chunk)
    new_vals, idx = jax.lax.top_k(sims, kk)
    new_labels = jnp.take_along_axis(new_labels, idx, axis=1)
    return _merge_topk(*carry, new_vals, new_labels, k), None

  init = (jnp.full((b, k), _NEG_INF, jnp.float32), jnp.zeros((b, k), jnp.int32))
  (vals, labels), _ = jax.lax.scan(step, init, (bank, bank_labels, bank_valid))
  return vals, labels


def _vote_counts(sims, labels, query_labels, query_valid, *, ks, num_classes,
                 temperature):
  """Correct-prediction counts per k: [len(ks), 2] (top-1, top-5)."""
  rows = jnp.arange(sims.shape[0])[:, None]
  counts = []
  for k in ks:
    weights = jnp.exp(sims[:, :k] / temperature)  # exp(-inf) = 0 for empty slots.
    votes = jnp.zeros((sims.shape[0], num_classes), jnp.float32)
    votes = votes.at[rows, labels[:, :k]].add(weights)
    top1 = jnp.argmax(votes, axis=1) == query_labels
    if num_classes >= 5:
      _, top5_idx = jax.lax.top_k(votes, 5)
      top5 = jnp.any(top5_idx == query_labels[:, None], axis=1)
    else:
      top5 = top1
    counts.append(jnp.stack([jnp.sum(top1 & query_valid),
                             jnp.sum(top5 & query_valid)]))
  return jnp.stack(counts).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("ks", "num_classes", "temperature", "chunk", "mesh"))
def _knn_block(queries, query_labels, query_valid, bank, bank_labels,
               bank_valid, *, ks, num_classes, temperature, chunk, mesh):
  """Counts correct top-1/top-5 predictions for one block of queries."""
  k = max(ks)
  queries = _l2_normalize(queries)
  if mesh is None:
    sims, labels = _chunked_topk(queries, bank, bank_labels, bank_valid,
                                 k=k, chunk=chunk)
  else:
    axes = tuple(mesh.axis_names)

    def local_then_merge(q, bank, bank_labels, bank_valid):
      sims, labels = _chunked_topk(q, bank, bank_labels, bank_valid,
                                   k=k, chunk=chunk)
      # [devices, b, k], gathered in shard order so ties keep index order.
      sims = jax.lax.all_gather(sims, axes)
      labels = jax.lax.all_gather(labels, axes)
      sims = jnp.moveaxis(sims, 0, 1).reshape(q.shape[0], -1)
      labels = jnp.moveaxis(labels, 0, 1).reshape(q.shape[0], -1)
      sims, idx = jax.lax.top_k(sims, k)
      return sims, jnp.take_along_axis(labels, idx, axis=1)

    sims, labels = jax.shard_map(
        local_then_merge, mesh=mesh,
        in_specs=(P(), P(axes), P(axes), P(axes)),
        out_specs=(P(), P()), check_vma=False)(
            queries, bank, bank_labels, bank_valid)
  return _vote_counts(sims, labels, query_labels, query_valid, ks=ks,
                      num_classes=num_classes, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("out_sharding",))
def _normalize_bank(bank, *, out_sharding=None):
  out = _l2_normalize(bank)
  if out_sharding is not None:
    out = jax.lax.with_sharding_constraint(out, out_sharding)
  return out


def _as_host(x: Any, name: str, ndim: int) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}.")
  return x


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad], axis=0)


def _put(x: np.ndarray, sharding: Optional[NamedSharding]) -> jax.Array:
  if sharding is None:
    return jnp.asarray(x)
  # Works on one or many hosts, as long as every host holds the full array.
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def knn_classify(bank_feats, bank_labels, query_feats, query_labels, *,
                 num_classes: int, ks: Sequence[int] = (20,),
                 temperature: float = 0.07, bank_mask=None, query_mask=None,
                 mesh: Optional[Mesh] = None,
                 block_size: int = 4096) -> dict[str, float]:
  """Weighted k-NN accuracy of queries against a labelled feature bank.

  Args:
    bank_feats: [n, d] features (numpy or jax).
    bank_labels: [n] int class ids in [0, num_classes).
    query_feats: [q, d] features.
    query_labels: [q] int class ids.
    num_classes: number of classes.
    ks: neighbour counts to evaluate; the top max(ks) is computed once.
    temperature: neighbour weight is exp(cosine_sim / temperature).
    bank_mask: optional [n] bool; False rows (padding) are never neighbours.
    query_mask: optional [q] bool; False rows are not counted.
    mesh: optional mesh; the bank is sharded over all its devices.
    block_size: queries per block and bank rows per similarity chunk.

  Returns:
    {'knn_top1_k{k}': acc, 'knn_top5_k{k}': acc} for each k (top-5 only when
    num_classes >= 5); accuracies in [0, 1] over valid queries.
  """
  ks = tuple(sorted({int(k) for k in ks}))
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be positive neighbour counts, got {ks}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")

  bank_feats = _as_host(bank_feats, "bank_feats", 2)
  query_feats = _as_host(query_feats, "query_feats", 2)
  bank_labels = _as_host(bank_labels, "bank_labels", 1).astype(np.int32)
  query_labels = _as_host(query_labels, "query_labels", 1).astype(np.int32)
  n, d = bank_feats.shape
  q = query_feats.shape[0]
  if query_feats.shape[1] != d:
    raise ValueError(f"feature dims differ: bank {bank_feats.shape} vs "
                     f"queries {query_feats.shape}.")
  if bank_labels.shape != (n,) or query_labels.shape != (q,):
    raise ValueError("labels must be [n] matching features: got bank "
                     f"{bank_labels.shape} for {n} rows, queries "
                     f"{query_labels.shape} for {q} rows.")
  bank_valid = (np.ones(n, bool) if bank_mask is None
                else _as_host(bank_mask, "bank_mask", 1).astype(bool))
  query_valid = (np.ones(q, bool) if query_mask is None
                 else _as_host(query_mask, "query_mask", 1).astype(bool))
  if bank_valid.shape != (n,) or query_valid.shape != (q,):
    raise ValueError("masks must be [n] matching their features.")
  n_valid_bank = int(bank_valid.sum())
  if ks[-1] > n_valid_bank:
    raise ValueError(f"k={ks[-1]} exceeds the {n_valid_bank} valid bank rows: "
                     "use smaller ks or a bigger bank.")
  for name, labels, valid in (("bank", bank_labels, bank_valid),
                              ("query", query_labels, query_valid)):
    used = labels[valid]
    if used.size and (used.min() < 0 or used.max() >= num_classes):
      raise ValueError(f"{name} labels must lie in [0, {num_classes}), got "
                       f"[{used.min()}, {used.max()}]: check num_classes.")

  n_shards = 1 if mesh is None else mesh.devices.size
  chunk = min(block_size, math.ceil(n / n_shards))
  n_pad = n_shards * chunk * math.ceil(n / (n_shards * chunk))
  bank_sharding = query_sharding = None
  if mesh is not None:
    bank_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    query_sharding = NamedSharding(mesh, P())
  bank = _normalize_bank(
      _put(_pad_rows(bank_feats, n_pad), bank_sharding),
      out_sharding=bank_sharding)
  bank_labels_dev = _put(_pad_rows(bank_labels, n_pad), bank_sharding)
  bank_valid_dev = _put(_pad_rows(bank_valid, n_pad), bank_sharding)

  block = min(block_size, q) if q else 1
  totals = np.zeros((len(ks), 2), np.int64)
  for start in range(0, q, block):
    stop = min(start + block, q)
    qb = _pad_rows(query_feats[start:stop], block)
    lb = _pad_rows(query_labels[start:stop], block)
    vb = _pad_rows(query_valid[start:stop], block)
    counts = _knn_block(
        _put(qb, query_sharding), _put(lb, query_sharding),
        _put(vb, query_sharding), bank, bank_labels_dev, bank_valid_dev,
        ks=ks, num_classes=int(num_classes), temperature=float(temperature),
        chunk=chunk, mesh=mesh)
    totals += np.asarray(counts.addressable_data(0))

  n_queries = max(int(query_valid.sum()), 1)
  results = {}
  for i, k in enumerate(ks):
    results[f"knn_top1_k{k}"] = float(totals[i, 0]) / n_queries
    if num_classes >= 5:
      results[f"knn_top5_k{k}"] = float(totals[i, 1]) / n_queries
  return results
