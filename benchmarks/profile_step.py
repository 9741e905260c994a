"""Where the train step's time goes: a profiler trace of our step, summed by XLA operation.

  nice -n 5 python benchmarks/profile_step.py [--row=vit_tiny_32_b64] [--steps=3] [--top=25]
  python benchmarks/profile_step.py --config=configs/fashion_mnist.py --steps=10   # the demo
  python benchmarks/profile_step.py --trace_dir=/tmp/trace ...   # keep it (TensorBoard, Perfetto)

The step is the one `benchmarks/xla_options.py` times (a `benchmarks/train_step.py` row, or a
config file's step on a synthetic batch), compiled with the project's options. After
`--warmup` steps, `--steps` steps run under `jax.profiler`; the trace's XLA operation events
(XLA:CPU's thunks on its intra-op threads) are summed by kind: the HLO name without its
number (`dot`, `wrapped_reduce-window`, `copy_bitcast_fusion`, ...), and by family (matmuls,
reductions, layout copies, linear algebra, other fusions). It prints ms per step and share
of each, and the largest single operations, next to the wall time per step (measured in a
separate loop without the profiler).

Matmuls are undercounted: XLA:CPU runs a dot asynchronously (Eigen's or YNNPACK's tasks, not
traced as the dot), so the trace holds the dot's dispatch, not its compute (the demo's 127
dots per step: 59 ms in the trace, against ~105 ms for their FLOPs at the matmul peak). The
script prints that estimate instead: XLA's FLOP count of the step over a 2048^3 `jnp.dot`
measured in the same run. The other operations' times are their own, summed over threads.

On a GPU the XLA operations are on the device planes; this script reads the host's
(XLA:CPU) planes, so use the trace in TensorBoard's profile plugin there.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import tempfile
import time

import common  # pylint: disable=g-import-not-at-top  # puts the repository on sys.path
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import xla_options  # pylint: disable=g-import-not-at-top,wrong-import-position

import train_step as bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position

# (family, pattern of the operation kind), first match wins.
FAMILIES = (
    ("linear algebra", r"triangular|cholesky|custom-call|lapack|eigh|(^|_)lu($|_)"),
    # Library fusions (YNNPACK, XNNPACK, oneDNN) hold dots where those are on.
    ("matmuls", r"(^|_)dot|convolution|conv_general|gemm|matmul|ynn_fusion|xnn_fusion|onednn"),
    ("reductions", r"reduce"),
    ("layout copies", r"^copy|transpose|^bitcast_copy|^wrapped_copy"),
)
OTHER = "other fusions"
# Executor bookkeeping on the same threads, not XLA operations ('end: X' marks the end of an
# operation X that is already counted).
_NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "Wait for", "end: ")


@dataclasses.dataclass
class Profile:
  """Operation time of `steps` profiled steps on `threads` XLA threads, in seconds."""

  by_kind: dict  # {kind: seconds}
  count_by_kind: dict  # {kind: events}
  by_op: dict  # {HLO name: seconds}
  threads: int
  steps: int

  @property
  def total(self) -> float:
    return sum(self.by_kind.values())


def op_kind(name: str) -> str:
  """'multiply_bitcast_fusion.12' -> 'multiply_bitcast_fusion'; 'dot.3' -> 'dot'."""
  return re.sub(r"(\.\d+)+$", "", name)


def family(kind: str) -> str:
  for name, pattern in FAMILIES:
    if re.search(pattern, kind):
      return name
  return OTHER


def read_xspace(path: str):
  """The XSpace proto of an `*.xplane.pb` file (TensorFlow's copy of the proto)."""
  try:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        f"reading the trace needs TensorFlow's xplane proto ({e}): pip install tensorflow-cpu"
    ) from e
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  return space


def summarize_xspace(space, steps: int) -> Profile:
  """Sums the XLA:CPU operation events of the host plane's XLA threads."""
  by_kind, count, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  threads = 0
  for plane in space.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      # XLA:CPU runs operations on its intra-op pool ('tf_XLAEigen/...') and, for the
      # first operation of a program, on the client's thread ('tf_XLAPjRtCpuClient/...').
      if not line.name.startswith("tf_XLA"):
        continue
      threads += line.name.startswith("tf_XLAEigen")
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if name.startswith(_NOT_OPS) or "::" in name:
          continue
        seconds = event.duration_ps * 1e-12
        by_kind[op_kind(name)] += seconds
        count[op_kind(name)] += 1
        by_op[name] += seconds
  if not by_kind:
    raise ValueError(
        "the trace has no XLA:CPU operation events (a GPU/TPU run keeps them on the device "
        "planes: open the trace in TensorBoard's profile plugin instead)."
    )
  return Profile(dict(by_kind), dict(count), dict(by_op), max(threads, 1), steps)


def tables(
    profile: Profile, wall_seconds: float, top: int, matmul_seconds: float | None = None
) -> str:
  """Markdown: families, top kinds, top single operations; then the wall time per step and
  `matmul_seconds`, the estimated matmul time per step (the trace undercounts dots)."""
  per_step = lambda s: 1e3 * s / profile.steps
  share = lambda s: 100 * s / profile.total
  families = collections.Counter()
  for kind, seconds in profile.by_kind.items():
    families[family(kind)] += seconds
  out = ["| family | traced ms / step | share |", "|---|---|---|"]
  out += [f"| {f} | {per_step(s):.1f} | {share(s):.1f}% |" for f, s in families.most_common()]
  out += ["", "| operation kind | traced ms / step | share | per step |", "|---|---|---|---|"]
  for kind, seconds in collections.Counter(profile.by_kind).most_common(top):
    n = profile.count_by_kind[kind] / profile.steps
    out.append(f"| `{kind}` | {per_step(seconds):.1f} | {share(seconds):.1f}% | {n:g} |")
  out += ["", "| largest operations | traced ms / step | share |", "|---|---|---|"]
  for name, seconds in collections.Counter(profile.by_op).most_common(min(top, 10)):
    out.append(f"| `{name}` | {per_step(seconds):.2f} | {share(seconds):.1f}% |")
  out.append("")
  summary = (
      f"wall {1e3 * wall_seconds:.1f} ms per step; traced operation time "
      f"{per_step(profile.total):.1f} ms per step, summed over {profile.threads} XLA threads"
  )
  if matmul_seconds:
    summary += (
        f"; the step's FLOPs at the matmul peak: {1e3 * matmul_seconds:.1f} ms (dots run "
        "asynchronously: their compute is not in the trace)"
    )
  out.append(summary)
  return "\n".join(out)


def matmul_peak(n: int = 2048, repeats: int = 3) -> float:
  """FLOP/s of an n^3 float32 `jnp.dot`, best of `repeats`."""
  a = jax.numpy.ones((n, n), jax.numpy.float32)
  dot = jax.jit(jax.numpy.dot)
  jax.block_until_ready(dot(a, a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def profile_step(step, state, batch, *, steps: int, warmup: int, trace_dir: str):
  """(wall seconds per step, Profile, path of the trace) of `steps` profiled steps."""
  runner = bench_step.JaxRunner(step, state, batch)
  runner.run(max(warmup, 1))  # compiles
  wall = runner.run(steps)
  jax.profiler.start_trace(trace_dir)
  try:
    runner.run(steps)
  finally:
    jax.profiler.stop_trace()
  paths = [
      os.path.join(root, f)
      for root, _, files in os.walk(trace_dir)
      for f in files
      if f.endswith(".xplane.pb")
  ]
  path = max(paths, key=os.path.getmtime)
  return wall, summarize_xspace(read_xspace(path), steps), path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", default="vit_tiny_32_b64", choices=sorted(bench_step.ROWS))
  parser.add_argument("--config", default="", help="FILE.py[:preset]: this config's step instead")
  parser.add_argument("--steps", type=int, default=3, help="profiled steps (and timed steps)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--top", type=int, default=25, help="operation kinds listed")
  parser.add_argument("--trace_dir", default="", help="keep the trace here (default: a temp dir)")
  parser.add_argument("--json_out", default="", help="write the sums here")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.top < 1:
    parser.error("--steps and --top must be at least 1.")
  print(
      f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
      f"jax {jax.__version__}; step: {args.config or args.row}; load average {os.getloadavg()}",
      flush=True,
  )
  step, state, batch, _ = xla_options.build_step(args)
  compiled = step.lower(state, batch).compile()  # the jit's own compiler options apply
  flops = common.xla_flops(compiled)
  matmul_seconds = flops / matmul_peak() if flops else None
  with tempfile.TemporaryDirectory() as scratch:
    t0 = time.perf_counter()
    wall, profile, path = profile_step(
        compiled,
        state,
        batch,
        steps=args.steps,
        warmup=args.warmup,
        trace_dir=args.trace_dir or scratch,
    )
    kept = f"; trace {path}" if args.trace_dir else " (--trace_dir keeps the trace)"
    print(f"profiled {args.steps} steps in {time.perf_counter() - t0:.0f} s{kept}")
    print(tables(profile, wall, args.top, matmul_seconds))
  if args.json_out:
    with open(args.json_out, "w") as f:
      extra = {"wall_seconds_per_step": wall, "matmul_seconds_per_step": matmul_seconds}
      json.dump(dataclasses.asdict(profile) | extra, f, indent=1)


if __name__ == "__main__":
  main()
