"""Hamming top-k search throughput: packed XOR+popcount vs float matmul vs numpy.

Database: random codes (default 1M x 256 bits). All three methods return the
exact top-k with ties broken by database index, and the script checks that
they agree before printing queries/s.

  python benchmarks/retrieval.py [--num_db 1000000 --bits 256 --queries 512]

Methods:
  jax_packed:  bits_jax.evaluate.retrieval.hamming_topk on uint32 words.
  jax_matmul:  the same blocked search, but distances from a float32 matmul
               of unpacked +-1 codes, d = (bits - <q, x>) / 2; selected with
               the same retrieval.smallest_k, and with a plain lax.top_k.
  numpy_popcount: np.bitwise_count on uint64 words, exact top-k via
               np.partition + a stable sort of the candidates.
"""

import argparse
import functools
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from bits_jax.evaluate import retrieval


@functools.partial(jax.jit, static_argnames=("k", "db_block", "n_valid", "grouped"))
def _matmul_topk(q_pm1, db_pm1, *, k, db_block, n_valid, grouped):
  """Exact top-k by Hamming distance from +-1 float codes (blocked matmul).

  grouped: select with retrieval.smallest_k (as jax_packed does) instead of
  a plain lax.top_k over every score.
  """
  nq, n_bits = q_pm1.shape
  n_blocks = db_pm1.shape[0] // db_block
  blocks = db_pm1.reshape(n_blocks, db_block, n_bits)

  def step(carry, xs):
    best, best_idx = carry
    block, offset = xs
    # Integer-valued dot products: exact in float32 for up to 2^24 bits.
    score = jnp.matmul(q_pm1, block.T, precision=jax.lax.Precision.HIGHEST)
    valid = offset + jnp.arange(db_block) < n_valid  # Padding rows last.
    score = jnp.where(valid[None, :], score, -jnp.inf)
    if grouped:
      neg_k, pos = retrieval.smallest_k(-score, k)
      score_k = -neg_k
    else:
      score_k, pos = jax.lax.top_k(score, k)
    score = jnp.concatenate([best, score_k], axis=1)
    idx = jnp.concatenate([best_idx, pos.astype(jnp.int32) + offset], axis=1)
    best, pos = jax.lax.top_k(score, k)
    return (best, jnp.take_along_axis(idx, pos, axis=1)), None

  init = (jnp.full((nq, k), -jnp.inf), jnp.zeros((nq, k), jnp.int32))
  offsets = jnp.arange(n_blocks, dtype=jnp.int32) * db_block
  (best, idx), _ = jax.lax.scan(step, init, (blocks, offsets))
  return ((n_bits - best) / 2).astype(jnp.int32), idx


def _random_words(rng, n, bits):
  """Uniform random codes, packed: [n, ceil(bits / 32)] uint32, tail zero."""
  words = rng.integers(0, 2**32, size=(n, -(-bits // 32)), dtype=np.uint32)
  if bits % 32:
    words[:, -1] &= np.uint32((1 << (bits % 32)) - 1)
  return words


@functools.partial(jax.jit, static_argnames=("bits",))
def _unpack_pm1(words, *, bits):
  """[n, w] uint32 -> [n, bits] float32 +-1, built on device (no host copy)."""
  shifts = jnp.arange(32, dtype=jnp.uint32)
  on = (words[:, :, None] >> shifts) & 1
  return (2.0 * on.reshape(words.shape[0], -1)[:, :bits] - 1.0).astype(jnp.float32)


def _numpy_topk(q64, db64, k, query_block=4):
  """Exact top-k with np.bitwise_count; ties broken by index."""
  dists, idxs = [], []
  for start in range(0, q64.shape[0], query_block):
    q = q64[start : start + query_block]
    dist = np.bitwise_count(q[:, None, :] ^ db64[None, :, :]).sum(axis=-1, dtype=np.int32)
    for row in dist:
      kth = np.partition(row, k - 1)[k - 1]
      cand = np.flatnonzero(row <= kth)  # Index order.
      cand = cand[np.argsort(row[cand], kind="stable")[:k]]
      dists.append(row[cand])
      idxs.append(cand)
  return np.stack(dists), np.stack(idxs)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _to_uint64(words: np.ndarray) -> np.ndarray:
  if words.shape[1] % 2:
    words = np.pad(words, ((0, 0), (0, 1)))
  return np.ascontiguousarray(words).view(np.uint64)


def _time(fn, repeats):
  """Best wall time of repeats calls (after one warm-up / compile call)."""
  out = fn()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def _time_matmul(q_words, db_words, args, results):
  """Times both matmul baselines; the 1 GB +-1 database lives only here."""
  n_pad = args.db_block * math.ceil(args.num_db / args.db_block)
  db_pm1 = _unpack_pm1(jnp.pad(db_words, ((0, n_pad - args.num_db), (0, 0))), bits=args.bits)
  q_pm1 = _unpack_pm1(q_words, bits=args.bits)
  outputs = []
  for grouped, name in ((True, "same top-k"), (False, "lax.top_k")):
    t, out = _time(
        lambda g=grouped: jax.block_until_ready(
            _matmul_topk(
                q_pm1, db_pm1, k=args.k, db_block=args.db_block, n_valid=args.num_db, grouped=g
            )
        ),
        args.repeats,
    )
    results[f"jax_matmul (+-1 float32, {name})"] = (args.queries, t)
    outputs.append(out)
  return outputs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_db", type=int, default=1_000_000)
  parser.add_argument("--bits", type=int, default=256)
  parser.add_argument("--queries", type=int, default=512)
  parser.add_argument(
      "--numpy_queries", type=int, default=64, help="numpy is timed on the first this many queries."
  )
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--db_block", type=int, default=65536)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  rng = np.random.default_rng(args.seed)
  db_words = jnp.asarray(_random_words(rng, args.num_db, args.bits))
  q_words = jnp.asarray(_random_words(rng, args.queries, args.bits))

  results = {}
  t, packed = _time(
      lambda: jax.block_until_ready(
          retrieval.hamming_topk(q_words, db_words, args.k, db_block=args.db_block)
      ),
      args.repeats,
  )
  results["jax_packed (XOR+popcount)"] = (args.queries, t)
  print(f"jax_packed done: {t:.2f}s", flush=True)

  matmul, matmul_plain = _time_matmul(q_words, db_words, args, results)

  db64 = _to_uint64(np.asarray(db_words))
  q64 = _to_uint64(np.asarray(q_words))[: args.numpy_queries]
  t, numpy_out = _time(lambda: _numpy_topk(q64, db64, args.k), 1)
  results["numpy_popcount (uint64)"] = (args.numpy_queries, t)

  for other in (matmul, matmul_plain):
    np.testing.assert_array_equal(np.asarray(other[1]), np.asarray(packed[1]))
    np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(packed[0]))
  np.testing.assert_array_equal(numpy_out[1], np.asarray(packed[1])[: args.numpy_queries])

  print(
      f"machine: {_cpu_name()}, {os.cpu_count()} cores, load average "
      f"{os.getloadavg()[0]:.1f} at the end; jax {jax.__version__} on "
      f"{jax.default_backend()} ({jax.devices()[0].device_kind}), numpy "
      f"{np.__version__}"
  )
  print(
      f"database {args.num_db} x {args.bits} bits, top-{args.k}, exact, "
      "ties by index; all methods return identical neighbours\n"
  )
  base = results["jax_packed (XOR+popcount)"]
  base_qps = base[0] / base[1]
  print("| method | queries | seconds | queries/s | packed speed-up |")
  print("|---|---:|---:|---:|---:|")
  for name, (n, t) in results.items():
    qps = n / t
    print(f"| {name} | {n} | {t:.2f} | {qps:,.0f} | {base_qps / qps:.2f}x |")


if __name__ == "__main__":
  main()
