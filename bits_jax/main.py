"""Entry point: python -m bits_jax.main --config=configs/<name>.py[:preset] --workdir=DIR.

Config values are overridden from the command line, e.g. `--config.total_steps=100`.
Running the same command again with the same workdir resumes from the latest checkpoint.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bits_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:preset]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
