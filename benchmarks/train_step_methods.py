"""Train-step throughput of each method on one config, interleaved so load affects all alike.

  python benchmarks/train_step_methods.py [--config=configs/fashion_mnist.py[:preset]] \
      [--methods=bits,dino,simdino] [--rounds=3] [--steps=5]

Each method's jitted train step (same backbone, batch and views; synthetic batch, so the
input pipeline is not measured) is compiled once, then timed in rounds A, B, C, A, B, C, ...
of `--steps` steps; prints the median steps/s per method over the rounds.
"""

import argparse
import os
import statistics
import time

import common  # pylint: disable=g-import-not-at-top  # puts the repository on sys.path
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bits_jax import compare  # pylint: disable=g-import-not-at-top,wrong-import-position
from bits_jax import train_state  # pylint: disable=g-import-not-at-top,wrong-import-position
from bits_jax import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from bits_jax import utils  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument(
      "--config",
      default=os.path.join(common.REPO, "configs", "fashion_mnist.py"),
      help="config file, FILE.py[:preset] (as --config= of bits_jax.main).",
  )
  parser.add_argument("--methods", default="bits,dino,simdino")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  methods = args.methods.split(",")
  base = utils.load_config_file(args.config)
  runners = {}
  for method in methods:
    config = compare.method_config(base, method)  # as `bits_jax.compare` trains it
    components = train_state.build(config)
    state = train_state.create(components, config, jax.random.PRNGKey(config.seed))
    step = jax.jit(train_step.make_train_step(components, config))
    batch = jax.device_put(common.synthetic_batch(config))
    t0 = time.time()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    print(f"{method}: compiled + first step in {time.time() - t0:.1f} s", flush=True)
    runners[method] = [step, state, batch]
  rates = {m: [] for m in methods}
  for _ in range(args.rounds):
    for method in methods:
      step, state, batch = runners[method]
      t0 = time.time()
      for _ in range(args.steps):
        state, _ = step(state, batch)
      jax.block_until_ready(state)
      rates[method].append(args.steps / (time.time() - t0))
      runners[method][1] = state
  print(f"devices: {jax.devices()}, load average: {os.getloadavg()}")
  for method in methods:
    print(
        f"{method}: {statistics.median(rates[method]):.3f} steps/s "
        f"(rounds: {', '.join(f'{r:.3f}' for r in rates[method])})"
    )


if __name__ == "__main__":
  main()
