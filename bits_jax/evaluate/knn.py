"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalized; each query votes with its k most cosine-similar
bank rows, each neighbour weighted by exp(sim / temperature). Queries are
processed in fixed-size blocks and the bank in fixed-size chunks, so a
1.28M x 768 bank never becomes one similarity matrix. With a mesh the bank is
sharded over all devices: each device keeps its local top-k, then the
per-device candidates are gathered and merged.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from bits_jax import utils
from bits_jax.evaluate import common

_NEG_INF = -jnp.inf


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
    sims = jnp.matmul(queries, chunk_feats.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(chunk_valid[None, :], sims, _NEG_INF)
    new_labels = jnp.broadcast_to(chunk_labels[None, :], sims.shape)
    kk = min(k, chunk)
    new_vals, idx = jax.lax.top_k(sims, kk)
    new_labels = jnp.take_along_axis(new_labels, idx, axis=1)
    return _merge_topk(*carry, new_vals, new_labels, k), None

  init = (jnp.full((b, k), _NEG_INF, jnp.float32), jnp.zeros((b, k), jnp.int32))
  (vals, labels), _ = jax.lax.scan(step, init, (bank, bank_labels, bank_valid))
  return vals, labels


def _votes(sims, labels, *, k, num_classes, temperature):
  """Class scores [b, num_classes]: sum of exp(sim / T) over the top k."""
  weights = jnp.exp(sims[:, :k] / temperature)  # exp(-inf) = 0: empty slot.
  rows = jnp.arange(sims.shape[0])[:, None]
  votes = jnp.zeros((sims.shape[0], num_classes), jnp.float32)
  return votes.at[rows, labels[:, :k]].add(weights)


def _vote_counts(sims, labels, query_labels, query_valid, *, ks, num_classes, temperature):
  """Correct-prediction counts per k: [len(ks), 2] (top-1, top-5)."""
  counts = []
  for k in ks:
    votes = _votes(sims, labels, k=k, num_classes=num_classes, temperature=temperature)
    top1 = jnp.argmax(votes, axis=1) == query_labels
    if num_classes >= 5:
      _, top5_idx = jax.lax.top_k(votes, 5)
      # A class no neighbour voted for is not a top-5 guess (with fewer than 5 voted classes,
      # top_k would fill up with zero-vote classes, lowest ids first).
      voted = jnp.any((labels[:, :k] == query_labels[:, None]) & (sims[:, :k] > _NEG_INF), axis=1)
      top5 = jnp.any(top5_idx == query_labels[:, None], axis=1) & voted
    else:
      top5 = top1
    counts.append(jnp.stack([jnp.sum(top1 & query_valid), jnp.sum(top5 & query_valid)]))
  return jnp.stack(counts).astype(jnp.int32)


def _neighbours(queries, bank, bank_labels, bank_valid, *, k, chunk, mesh):
  """Top-k (sims, labels) [b, k] of raw queries against the prepared bank."""
  queries = utils.l2_normalize(queries.astype(jnp.float32))
  if mesh is None:
    return _chunked_topk(queries, bank, bank_labels, bank_valid, k=k, chunk=chunk)
  axes = tuple(mesh.axis_names)

  def local_then_merge(q, bank, bank_labels, bank_valid):
    sims, labels = _chunked_topk(q, bank, bank_labels, bank_valid, k=k, chunk=chunk)
    # [devices, b, k], gathered in shard order so ties keep index order.
    sims = jax.lax.all_gather(sims, axes)
    labels = jax.lax.all_gather(labels, axes)
    sims = jnp.moveaxis(sims, 0, 1).reshape(q.shape[0], -1)
    labels = jnp.moveaxis(labels, 0, 1).reshape(q.shape[0], -1)
    sims, idx = jax.lax.top_k(sims, k)
    return sims, jnp.take_along_axis(labels, idx, axis=1)

  return jax.shard_map(
      local_then_merge,
      mesh=mesh,
      in_specs=(P(), P(axes), P(axes), P(axes)),
      out_specs=(P(), P()),
      check_vma=False,
  )(queries, bank, bank_labels, bank_valid)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes", "temperature", "chunk", "mesh"))
def _knn_block(
    queries,
    query_labels,
    query_valid,
    bank,
    bank_labels,
    bank_valid,
    *,
    ks,
    num_classes,
    temperature,
    chunk,
    mesh,
):
  """Counts correct top-1/top-5 predictions for one block of queries."""
  sims, labels = _neighbours(
      queries, bank, bank_labels, bank_valid, k=max(ks), chunk=chunk, mesh=mesh
  )
  return _vote_counts(
      sims,
      labels,
      query_labels,
      query_valid,
      ks=ks,
      num_classes=num_classes,
      temperature=temperature,
  )


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "temperature", "chunk", "mesh"))
def _predict_block(
    queries, bank, bank_labels, bank_valid, *, k, num_classes, temperature, chunk, mesh
):
  """Predicted class [b] for one block of queries."""
  sims, labels = _neighbours(queries, bank, bank_labels, bank_valid, k=k, chunk=chunk, mesh=mesh)
  votes = _votes(sims, labels, k=k, num_classes=num_classes, temperature=temperature)
  return jnp.argmax(votes, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("out_sharding",))
def _normalize_bank(bank, *, out_sharding=None):
  out = utils.l2_normalize(bank.astype(jnp.float32))
  if out_sharding is not None:
    out = jax.lax.with_sharding_constraint(out, out_sharding)
  return out


def _as_host(x: Any, name: str, ndim: int) -> np.ndarray:
  x = utils.to_host(x)
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


def _even_block(n: int, limit: int) -> int:
  """Rows per block, at most ~limit, splitting n rows into equal blocks (a multiple of 8):
  10k queries in blocks of 4096 would pad the last to 12288 rows, 23% more work."""
  if n <= limit:
    return max(n, 1)
  blocks = -(-n // limit)
  size = -(-n // blocks)
  return min(limit, -(-size // 8) * 8)


def _check_args(ks: tuple[int, ...], temperature: float, block_size: int):
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be positive neighbour counts, got {ks}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")


def _check_labels(name: str, labels: np.ndarray, num_classes: int):
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{name} labels must lie in [0, {num_classes}), got "
        f"[{labels.min()}, {labels.max()}]: check num_classes."
    )


@dataclasses.dataclass(frozen=True)
class _Bank:
  """Normalized, padded (and, with a mesh, sharded) bank on device."""

  feats: jax.Array  # [n_pad, d] L2-normalized.
  labels: jax.Array  # [n_pad] int32.
  valid: jax.Array  # [n_pad] bool; False for masked and padding rows.
  chunk: int  # Bank rows per similarity block (per device).
  query_sharding: Optional[NamedSharding]

  @classmethod
  def build(
      cls,
      feats: np.ndarray,
      labels,
      mask,
      *,
      num_classes: int,
      k: int,
      dim: int,
      mesh: Optional[Mesh],
      block_size: int,
  ) -> "_Bank":
    n, d = feats.shape
    if d != dim:
      raise ValueError(f"feature dims differ: bank [{n}, {d}] vs queries [..., {dim}].")
    labels = _as_host(labels, "bank_labels", 1).astype(np.int32)
    if labels.shape != (n,):
      raise ValueError(f"bank_labels must be [{n}], got {labels.shape}.")
    valid = np.ones(n, bool) if mask is None else _as_host(mask, "bank_mask", 1).astype(bool)
    if valid.shape != (n,):
      raise ValueError(f"bank_mask must be [{n}], got {valid.shape}.")
    common.check_finite(feats, "bank_feats", valid)
    n_valid = int(valid.sum())
    if k > n_valid:
      raise ValueError(
          f"k={k} exceeds the {n_valid} valid bank rows: use smaller ks or a bigger bank."
      )
    _check_labels("bank", labels[valid], num_classes)
    n_shards = 1 if mesh is None else mesh.devices.size
    per_shard = math.ceil(n / n_shards)
    chunk = _even_block(per_shard, block_size)
    n_pad = n_shards * chunk * math.ceil(per_shard / chunk)
    bank_sharding = query_sharding = None
    if mesh is not None:
      bank_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
      query_sharding = NamedSharding(mesh, P())
    bank = _normalize_bank(_put(_pad_rows(feats, n_pad), bank_sharding), out_sharding=bank_sharding)
    return cls(
        bank,
        _put(_pad_rows(labels, n_pad), bank_sharding),
        _put(_pad_rows(valid, n_pad), bank_sharding),
        chunk,
        query_sharding,
    )

  def put_query(self, x: np.ndarray) -> jax.Array:
    return _put(x, self.query_sharding)


def knn_classify(
    bank_feats,
    bank_labels,
    query_feats,
    query_labels,
    *,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    bank_mask=None,
    query_mask=None,
    mesh: Optional[Mesh] = None,
    block_size: int = 4096,
) -> dict[str, float]:
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
    num_classes >= 5; a class that none of the k neighbours has is never a top-5 guess,
    so top-5 equals top-1 for k = 1); accuracies in [0, 1] over valid queries.

  Raises:
    ValueError: on NaN/inf in a valid bank or query row (masked rows may hold anything).
  """
  ks = tuple(sorted({int(k) for k in ks}))
  _check_args(ks, temperature, block_size)
  bank_feats = _as_host(bank_feats, "bank_feats", 2)
  query_feats = _as_host(query_feats, "query_feats", 2)
  query_labels = _as_host(query_labels, "query_labels", 1).astype(np.int32)
  q = query_feats.shape[0]
  if query_labels.shape != (q,):
    raise ValueError(f"query_labels must be [{q}], got {query_labels.shape}.")
  query_valid = (
      np.ones(q, bool) if query_mask is None else _as_host(query_mask, "query_mask", 1).astype(bool)
  )
  if query_valid.shape != (q,):
    raise ValueError(f"query_mask must be [{q}], got {query_valid.shape}.")
  _check_labels("query", query_labels[query_valid], num_classes)
  common.check_finite(query_feats, "query_feats", query_valid)
  bank = _Bank.build(
      bank_feats,
      bank_labels,
      bank_mask,
      num_classes=num_classes,
      k=ks[-1],
      dim=query_feats.shape[1],
      mesh=mesh,
      block_size=block_size,
  )

  block = _even_block(q, block_size)
  totals = np.zeros((len(ks), 2), np.int64)
  for start in range(0, q, block):
    stop = min(start + block, q)
    qb = _pad_rows(query_feats[start:stop], block)
    lb = _pad_rows(query_labels[start:stop], block)
    vb = _pad_rows(query_valid[start:stop], block)
    counts = _knn_block(
        bank.put_query(qb),
        bank.put_query(lb),
        bank.put_query(vb),
        bank.feats,
        bank.labels,
        bank.valid,
        ks=ks,
        num_classes=int(num_classes),
        temperature=float(temperature),
        chunk=bank.chunk,
        mesh=mesh,
    )
    totals += np.asarray(counts.addressable_data(0))

  n_queries = max(int(query_valid.sum()), 1)
  results = {}
  for i, k in enumerate(ks):
    results[f"knn_top1_k{k}"] = float(totals[i, 0]) / n_queries
    if num_classes >= 5:
      results[f"knn_top5_k{k}"] = float(totals[i, 1]) / n_queries
  return results


def knn_predict(
    bank_feats,
    bank_labels,
    query_feats,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    bank_mask=None,
    mesh: Optional[Mesh] = None,
    block_size: int = 4096,
) -> np.ndarray:
  """Weighted k-NN class predictions (same rule as knn_classify).

  Args:
    bank_feats: [n, d]; bank_labels: [n]; query_feats: [q, d].
    num_classes, k, temperature, bank_mask, mesh, block_size: as in
      knn_classify.

  Returns:
    [q] int32 predicted class ids (vote ties go to the lowest class id).
  """
  _check_args((int(k),), temperature, block_size)
  bank_feats = _as_host(bank_feats, "bank_feats", 2)
  query_feats = _as_host(query_feats, "query_feats", 2)
  common.check_finite(query_feats, "query_feats")
  bank = _Bank.build(
      bank_feats,
      bank_labels,
      bank_mask,
      num_classes=num_classes,
      k=int(k),
      dim=query_feats.shape[1],
      mesh=mesh,
      block_size=block_size,
  )
  q = query_feats.shape[0]
  block = _even_block(q, block_size)
  preds = []
  for start in range(0, q, block):
    stop = min(start + block, q)
    pred = _predict_block(
        bank.put_query(_pad_rows(query_feats[start:stop], block)),
        bank.feats,
        bank.labels,
        bank.valid,
        k=int(k),
        num_classes=int(num_classes),
        temperature=float(temperature),
        chunk=bank.chunk,
        mesh=mesh,
    )
    preds.append(np.asarray(pred.addressable_data(0))[: stop - start])
  return np.concatenate(preds) if preds else np.zeros(0, np.int32)


@common.register("knn")
def run(
    ctx,
    *,
    bank_split: str = "train",
    query_split: str = "test",
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
) -> dict[str, float]:
  """Weighted k-NN top-1 of the CLS features: `query_split` queries, `bank_split` bank."""
  bank, queries = ctx.features(bank_split), ctx.features(query_split)
  if np.ndim(bank["label"]) != 1 or np.ndim(queries["label"]) != 1:
    raise ValueError(
        "k-NN needs one class id per image; this dataset has multi-hot labels [n, classes]: "
        "evaluate it with retrieval (evals.retrieval) and turn k-NN off "
        "(evals.knn.every=0, evals.knn.at_end=False)."
    )
  return knn_classify(
      bank["cls"],
      bank["label"],
      queries["cls"],
      queries["label"],
      num_classes=ctx.num_classes,
      ks=tuple(ks),
      temperature=temperature,
      bank_mask=bank["mask"],
      query_mask=queries["mask"],
      mesh=ctx.mesh,
  )
