"""XLA compiler options on our train step: one lowered step compiled several ways, timed in turn.

  nice -n 5 python benchmarks/xla_options.py [--row=vit_tiny_32_b64] [--rounds=5] [--steps=2] \
      [--set='NAME:OPTION=VALUE;OPTION=VALUE' ...] [--json_out=sets.json]
  python benchmarks/xla_options.py --config=configs/fashion_mnist.py --steps=20   # the demo

The step is the project's (`train_step.compile_train_step`, with its own options, e.g. the
YNNPACK dot fusions off on a CPU) on a synthetic batch, for a `benchmarks/train_step.py` row
(`--row`) or a config file (`--config=FILE.py[:preset]`). Each `--set` adds its options on top
(XLA takes the later value of an option given twice); the first set, `project`, adds none.
Sets run in rounds A, B, C, A, B, C, ... of `--steps` steps each, so load from other jobs hits
every set alike; the table gives each set's median time per step over the rounds and its
ratio to `project`'s (the median of the per-round ratios). An option XLA refuses is reported
and its set skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import common  # pylint: disable=g-import-not-at-top  # puts the repository on sys.path
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from bits_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from bits_jax import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA:CPU options that change scheduling, fusion or the dot emitter, not the maths.
DEFAULT_SETS = (
    "project:",
    "concurrency scheduler:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "memory scheduler:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "XNNPACK graph fusion:xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "tiling propagation:xla_cpu_experimental_enable_tiling_propagation=true",
    "oneDNN dot fusion:xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
)


def parse_set(text: str) -> tuple[str, dict]:
  """'NAME:OPTION=VALUE;OPTION=VALUE' -> (NAME, {OPTION: VALUE}); 'NAME:' adds nothing."""
  if ":" not in text:
    raise ValueError(f"--set={text!r}: write NAME:OPTION=VALUE[;OPTION=VALUE] (or NAME:).")
  name, options = text.split(":", 1)
  parts = [p for p in options.split(";") if p.strip()]
  bad = [p for p in parts if "=" not in p]
  if not name.strip() or bad:
    raise ValueError(f"--set={text!r}: write NAME:OPTION=VALUE[;OPTION=VALUE] (or NAME:).")
  return name.strip(), dict(common.compiler_option(p.strip()) for p in parts)


def build_step(args):
  """(jitted step, initial state, batch on the device, images per step)."""
  if args.config:
    config = utils.load_config_file(args.config)
    step, state, mesh, _ = common.jitted_step(config, jax.devices()[:1])
    batch = jax.device_put(common.synthetic_batch(config), sharding.batch_sharding(mesh))
    return step, state, batch, int(config.input.batch_size)
  row = bench_step.ROWS[args.row]
  views = common.synthetic_batch(bench_step.row_config(row))
  step, state, batch, _ = bench_step.build_jax_step(row, views)
  return step, state, batch, row.batch


def time_sets(step, state, batch, sets: dict, rounds: int, steps: int) -> dict:
  """{name: [seconds per step, per round]} of the sets that compile; errors printed."""
  lowered = step.lower(state, batch)
  runners = {}
  for name, options in sets.items():
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=options or None)
    except Exception as e:  # pylint: disable=broad-except  # an option this XLA does not know
      print(f"{name}: not compiled: {common.first_line(e)}", flush=True)
      continue
    # The step donates its state: every set steps its own copy.
    runners[name] = bench_step.JaxRunner(compiled, jax.tree.map(jnp.copy, state), batch)
    runners[name].run(1)
    print(f"{name}: compiled and one step in {time.perf_counter() - t0:.1f} s", flush=True)
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, runner in runners.items():
      times[name].append(runner.run(steps))
  return times


def table(times: dict, images: int, base: str) -> str:
  lines = ["| set | ms / step | images/s | vs " + base + " |", "|---|---|---|---|"]
  for name, seconds in times.items():
    median = statistics.median(seconds)
    ratio = (
        statistics.median(s / b for s, b in zip(seconds, times[base])) if base in times else None
    )
    lines.append(
        f"| {name} | {1e3 * median:.1f} | {images / median:.1f} | "
        + (f"{ratio:.3f}x" if ratio is not None else "-")
        + " |"
    )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", default="vit_tiny_32_b64", choices=sorted(bench_step.ROWS))
  parser.add_argument("--config", default="", help="FILE.py[:preset]: this config's step instead")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per set per round")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="NAME:OPTION=VALUE;...",
      help="an option set (repeatable); default: the project's options and five XLA:CPU ones",
  )
  parser.add_argument("--json_out", default="", help="write the per-round timings here")
  args = parser.parse_args(argv)
  try:
    sets = dict(parse_set(s) for s in args.set or DEFAULT_SETS)
  except ValueError as e:
    parser.error(str(e))
  print(
      f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
      f"jax {jax.__version__}; step: {args.config or args.row}; load average {os.getloadavg()}",
      flush=True,
  )
  step, state, batch, images = build_step(args)
  times = time_sets(step, state, batch, sets, args.rounds, args.steps)
  print(table(times, images, next(iter(sets))))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"sets": sets, "seconds_per_step": times}, f, indent=1)


if __name__ == "__main__":
  main()
