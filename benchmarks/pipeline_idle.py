"""Does the train step wait for data? And what share of the step is the coding rate's log-det?

  nice -n 10 python benchmarks/pipeline_idle.py [--config=configs/fashion_mnist.py] \
      [--steps=40] [--sections=idle,rate] [--bits=256,4096] [--batches=64,1024]

Section `idle`: the config's real input pipeline (`data.make_train_iterator` +
`prefetch.prefetch_to_mesh`, as `bits_jax/train.py` runs it) feeds the real jitted train
step for `--steps` steps after a warm-up. Every step is synchronised, so the time spent in
`next(batches)` is exactly the time the device would sit idle between the previous step's end
and the next batch (the training loop dispatches a step ahead, which can only hide more of
it): idle fraction = sum(wait) / sum(wait + step). Also timed: the same step on one fixed
synthetic batch (no pipeline running), and the pipeline alone, to show how much the two
compete for the same CPU cores.

Section `rate`: for each (bits, batch) the config's train step with that head output and
batch, on a synthetic batch, next to the coding rate alone, forward and backward
(`rate_of_unit_rows` of the L2-normalised student logits of each global view, the Gram
matrix over min(n, bits), as the BITS loss computes it); share = rate time / step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common  # pylint: disable=g-import-not-at-top  # puts the repository on sys.path
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from bits_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from bits_jax import utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from bits_jax.objectives import coding_rate  # pylint: disable=g-import-not-at-top


def _timed_steps(step, state, batches, steps: int):
  """(state, waits, computes): seconds blocked in next(batches) and in each synced step."""
  waits, computes = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = next(batches)
    t1 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    t2 = time.perf_counter()
    waits.append(t1 - t0)
    computes.append(t2 - t1)
  return state, waits, computes


def idle_section(config, steps: int, warmup: int) -> None:
  # pylint: disable=g-import-not-at-top
  from bits_jax import data
  from bits_jax.data import prefetch

  # pylint: enable=g-import-not-at-top
  step, state, mesh, _ = common.jitted_step(config, None)  # all devices, as train.py
  batches = prefetch.prefetch_to_mesh(
      data.make_train_iterator(config), sharding.batch_sharding(mesh), size=2
  )
  t0 = time.perf_counter()
  state, _, _ = _timed_steps(step, state, batches, warmup)  # compiles; fills tf.data buffers
  print(f"compile + {warmup} warm-up steps: {time.perf_counter() - t0:.1f} s", flush=True)
  state, waits, computes = _timed_steps(step, state, batches, steps)
  wall = sum(waits) + sum(computes)

  fixed = next(batches)
  _, _, alone = _timed_steps(step, state, iter(lambda: fixed, None), steps)

  t0 = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(next(batches))
  pipeline_s = (time.perf_counter() - t0) / steps

  b = config.input.batch_size
  median = lambda xs: statistics.median(xs) * 1e3
  print(f"\nidle: {steps} steps of batch {b}, load average {os.getloadavg()}")
  print(
      f"  device idle (waiting in next(batches)): {100 * sum(waits) / wall:.1f}% of "
      f"{wall:.1f} s; median wait {median(waits):.1f} ms, max {max(waits) * 1e3:.1f} ms"
  )
  print(
      f"  step with the pipeline running: median {median(computes):.0f} ms "
      f"({b / statistics.median(computes):.0f} img/s)"
  )
  print(
      f"  step alone (fixed batch, pipeline paused): median {median(alone):.0f} ms "
      f"({b / statistics.median(alone):.0f} img/s)"
  )
  print(f"  pipeline alone: {pipeline_s * 1e3:.0f} ms per batch ({b / pipeline_s:.0f} img/s)")


def _median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def rate_section(base, bits_list, batch_list, repeats: int) -> None:
  rows = []
  for num_bits in bits_list:
    for batch in batch_list:
      config = base.copy_and_resolve_references()
      config.objective.bits.num_bits = num_bits
      config.input.batch_size = batch
      config.mesh = {"data": 1, "fsdp": 1}
      bits_config = config.objective.bits
      views = config.input.crops.num_global

      def rate(z, bits_config=bits_config):  # [G, n, bits], as the loss sees the student's
        zn = utils.l2_normalize(z.astype(jnp.float32))
        per_view = [
            coding_rate.rate_of_unit_rows(
                zn[g], bits_config.eps, convention=bits_config.get("rate_eps_convention", "simdino")
            )
            for g in range(z.shape[0])
        ]
        return jnp.mean(jnp.stack(per_view))

      z = jax.random.normal(jax.random.PRNGKey(0), (views, batch, num_bits))
      rate_s = _median_seconds(jax.jit(jax.value_and_grad(rate)), (z,), repeats)

      step, state, mesh, _ = common.jitted_step(config, jax.devices()[:1])
      batch_arrays = jax.device_put(common.synthetic_batch(config), sharding.batch_sharding(mesh))
      t0 = time.perf_counter()
      compiled = step.lower(state, batch_arrays).compile()
      compile_s = time.perf_counter() - t0
      holder = {"state": state}

      def run_step(batch_arrays):
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        return metrics

      step_s = _median_seconds(run_step, (batch_arrays,), repeats)
      gram = min(batch, num_bits)
      rows.append((num_bits, batch, gram, rate_s, step_s))
      print(
          f"bits {num_bits}, batch {batch}: Gram {gram}x{gram}, log-det fwd+bwd "
          f"{rate_s * 1e3:.1f} ms, step {step_s * 1e3:.0f} ms ({100 * rate_s / step_s:.1f}%), "
          f"step compiled in {compile_s:.0f} s",
          flush=True,
      )
  print(f"\ncoding rate (all {views} global views, fwd+bwd) as a share of the step:")
  print("| bits | batch | Gram | log-det fwd+bwd ms | step ms | share |\n|---|---|---|---|---|---|")
  for num_bits, batch, gram, rate_s, step_s in rows:
    print(
        f"| {num_bits} | {batch} | {gram}x{gram} | {rate_s * 1e3:.1f} | {step_s * 1e3:.0f} "
        f"| {100 * rate_s / step_s:.1f}% |"
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--config",
      default=os.path.join(common.REPO, "configs", "fashion_mnist.py"),
      help="config file, FILE.py[:preset] (as --config= of bits_jax.main); default: the demo",
  )
  parser.add_argument("--sections", default="idle,rate")
  parser.add_argument("--steps", type=int, default=40, help="timed steps (idle section)")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--bits", default="256,4096")
  parser.add_argument("--batches", default="64,1024")
  parser.add_argument("--repeats", type=int, default=5, help="timings per case (rate section)")
  args = parser.parse_args(argv)
  config = utils.load_config_file(args.config)
  print(
      f"{jax.devices()[0].device_kind} x {len(jax.devices())}, {os.cpu_count()} CPUs, "
      f"jax {jax.__version__}, {args.config}, {time.strftime('%Y-%m-%d %H:%M')}, "
      f"load average {os.getloadavg()}",
      flush=True,
  )
  sections = args.sections.split(",")
  if "idle" in sections:
    idle_section(config, args.steps, args.warmup)
  if "rate" in sections:
    ints = lambda s: [int(x) for x in s.split(",")]
    rate_section(config, ints(args.bits), ints(args.batches), args.repeats)


if __name__ == "__main__":
  main()
