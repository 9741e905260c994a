"""mAP@ALL cost of the paper's protocol: continuous features (sort) vs 256-bit codes (histograms).

Every query ranks the whole database exactly (ranking.py: AP@ALL, AP@k, P@k, ties at their
expectation), so both paths have the same recall (the full, exact ranking); only the
representation differs. Synthetic data: 1000 classes, features = class centre + noise (768-d),
codes = signs of a fixed random projection of class centre + independent noise (256 bits;
the asymmetric queries use the sigmoid of the projection). Each case runs in a
child process, timed on its second call (the first compiles), with the child's peak RSS.

  nice -n 10 python benchmarks/retrieval_map.py               # the table of the README
  python benchmarks/retrieval_map.py --num_db 1281167 --float_queries 4096   # on a big host

Cases:
  float:        ranking.scored_sums on L2-normalised 768-d features (matmul + uint32 sort).
  hamming:      ranking.hamming_histograms + histogram_sums, 256-bit codes, one variant.
  hamming x4:   the same scan with the first 256/128/64/32 bits at once (one pass).
  asymmetric:   sigmoid-probability queries vs database bits, 256 bits (matmul + sort).
  hamming full: 256-bit codes against a database of --full_db codes.
The per-pair cost is extrapolated to --full_queries x --full_db (the paper's 50k x 1.28M) by
multiplying with the number of pairs; sorting grows like n log n, so the float and asymmetric
extrapolations are also given times log2(full_db) / log2(num_db).

Measured (defaults; 2-core x86_64 VM shared with other jobs, jax 0.10.2 CPU, one device):
| case | queries x database | s, run 1 (load 2.1) | s, run 2 (load 6.6) | ns/pair, run 1 / 2 |
| --- | --- | ---: | ---: | ---: |
| float 768-d (sort) | 256 x 262,144 | 7.75 | 13.13 | 115 / 196 |
| asymmetric 256 bits (sort) | 256 x 262,144 | 6.21 | 11.15 | 93 / 166 |
| Hamming 256 bits (histograms) | 1024 x 262,144 | 2.18 | 3.23 | 8.1 / 12.1 |
| Hamming 256/128/64/32, one pass | 1024 x 262,144 | 3.75 | 9.27 | 14.0 / 34.5 |
| Hamming 256 bits | 1024 x 1,281,167 | 12.73 | 22.07 | 9.7 / 16.8 |
Hamming vs float per pair: 14.2x (run 1), 16.2x (run 2). Peak RSS: float 2.9 GB, asymmetric
1.9 GB, Hamming 1.1-1.4 GB (whole child process, data included). Extrapolated to 50k x 1.28M
on this CPU: float 2.0-3.5 h (2.3-3.9 h with the sort's log factor), Hamming 0.14-0.3 h.
mAP@ALL (run 2, synthetic): features 0.285, Hamming 0.189, asymmetric 0.346; the code rows of
run 1 used codes of the normalised features (near-chance mAP), same costs. Not measured on an
accelerator (none lent): there the float path's matmul (9.8e16 FLOP at 50k x 1.28M x 768) and
the sort dominate, while the codes read 32x less memory per database item.
"""

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

_NOISE = 3.0  # Per-dimension noise around unit-variance class centres.
_CODE_NOISE = 1.7  # Noise of the codes' source (see _data).


def _data(n: int, dim: int, bits: int, classes: int, seed: int, *, codes_only=False):
  """(features [n, dim] L2-normalised or None, codes [n, bits] bool, probabilities of the
  codes' logits [n, bits], labels [n]), generated in chunks (float32 throughout)."""
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(1234).standard_normal((classes, dim), np.float32)
  projection = np.random.default_rng(99).standard_normal((dim, bits), np.float32) / dim**0.5
  labels = rng.integers(0, classes, size=n).astype(np.int32)
  feats = None if codes_only else np.empty((n, dim), np.float32)
  codes = np.empty((n, bits), bool)
  probs = None if codes_only else np.empty((n, bits), np.float32)
  for start in range(0, n, 65536):
    rows = slice(start, min(start + 65536, n))
    x = centers[labels[rows]] + _NOISE * rng.standard_normal((len(labels[rows]), dim), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # Codes: a noisy random projection of the class centre, noise set so that their mAP is
    # close to the features' (a learned code is, in the paper: 47.6 vs 50.6).
    logits = (
        centers[labels[rows]]
        + _CODE_NOISE * rng.standard_normal((len(labels[rows]), dim), np.float32)
    ) @ projection
    codes[rows] = logits > 0
    if not codes_only:
      feats[rows] = x
      probs[rows] = 1 / (1 + np.exp(-logits))
  return feats, codes, probs, labels


def _case(args) -> dict:
  """Runs one case in this process: {'seconds', 'pairs', 'map_all', 'peak_rss_gb'}."""
  import jax  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import ranking  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import retrieval  # pylint: disable=g-import-not-at-top

  del jax
  n_db = args.full_db if args.case == "hamming_full" else args.num_db
  nq = args.float_queries if args.case in ("float", "asymmetric") else args.hamming_queries
  codes_only = args.case.startswith("hamming")
  db, db_codes, _, db_labels = _data(
      n_db, args.dim, args.bits, args.classes, 1, codes_only=codes_only
  )
  q, q_codes, q_probs, q_labels = _data(nq, args.dim, args.bits, args.classes, 2)
  ks = (100,)
  if args.case == "float":

    def fn():
      return ranking.summarize(ranking.scored_sums(q, q_labels, db, db_labels, ks=ks), ks)

  elif args.case == "asymmetric":
    del db
    queries, database = retrieval._asymmetric_vectors(  # pylint: disable=protected-access
        q_probs, db_codes, [np.arange(args.bits)]
    )

    def fn():
      return ranking.summarize(
          ranking.scored_sums(queries[0], q_labels, database, db_labels, ks=ks), ks
      )

  else:
    q_words, db_words = ranking.pack_rows(q_codes), ranking.pack_rows(db_codes)
    del db_codes
    words = args.bits // 32
    variants = [(0, words, args.bits)]
    if args.case == "hamming_x4":
      variants += [
          (0, words // 2, args.bits // 2),
          (0, words // 4, args.bits // 4),
          (0, words // 8, args.bits // 8),
      ]

    def fn():
      hists = ranking.hamming_histograms(
          q_words,
          q_labels,
          db_words,
          db_labels,
          variants=variants,
          query_block=args.query_block,
          db_block=args.db_block,
      )
      return ranking.summarize(ranking.histogram_sums(hists[0], ks), ks)

  fn()  # Compiles.
  start = time.perf_counter()
  metrics = fn()
  seconds = time.perf_counter() - start
  return {
      "seconds": seconds,
      "pairs": nq * n_db,
      "queries": nq,
      "database": n_db,
      "map_all": metrics["map_all"],
      "map@100": metrics["map@100"],
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }


_NAMES = {
    "float": "float 768-d (sort)",
    "asymmetric": "asymmetric codes (sort)",
    "hamming": "Hamming codes (histograms)",
    "hamming_x4": "Hamming 256/128/64/32 in one pass",
    "hamming_full": "Hamming codes, full database",
}


def main():
  """Runs every case in a child process and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_db", type=int, default=262144)
  parser.add_argument("--full_db", type=int, default=1281167)
  parser.add_argument("--full_queries", type=int, default=50000)
  parser.add_argument("--float_queries", type=int, default=256)
  parser.add_argument("--hamming_queries", type=int, default=1024)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--bits", type=int, default=256)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--query_block", type=int, default=256)
  parser.add_argument("--db_block", type=int, default=16384)
  parser.add_argument("--cases", nargs="+", default=list(_NAMES))
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if args.case:
    print(json.dumps(_case(args)))
    return

  rows = {}
  for case in args.cases:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case] + sys.argv[1:]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows[case] = json.loads(out.strip().splitlines()[-1])
    print(f"{case}: {rows[case]}", file=sys.stderr)
  log_factor = math.log2(args.full_db) / math.log2(args.num_db)
  full_pairs = args.full_queries * args.full_db
  print(
      f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
      f"load average {os.getloadavg()[0]:.1f}; database {args.num_db} (full-database row: "
      f"{args.full_db}), {args.dim}-d / {args.bits} bits, {args.classes} classes.\n"
  )
  print(
      "| case | queries x database | seconds | ns / pair | mAP@ALL | peak RSS GB | "
      f"{args.full_queries // 1000}k x {args.full_db / 1e6:.2f}M, hours |"
  )
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for case, r in rows.items():
    ns = r["seconds"] / r["pairs"] * 1e9
    hours = ns * 1e-9 * full_pairs / 3600
    extra = (
        f" ({hours * log_factor:.1f} with n log n)"
        if case in ("float", "asymmetric") and args.num_db < args.full_db
        else ""
    )
    print(
        f"| {_NAMES[case]} | {r['queries']} x {r['database']} | {r['seconds']:.2f} | "
        f"{ns:.2f} | {r['map_all']:.4f} | {r['peak_rss_gb']:.2f} | {hours:.2f}{extra} |"
    )
  if "float" in rows and "hamming" in rows:
    f, h = (rows[c]["seconds"] / rows[c]["pairs"] for c in ("float", "hamming"))
    print(f"\nHamming path speed-up over the float path (same database, per pair): {f / h:.1f}x")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
  main()
