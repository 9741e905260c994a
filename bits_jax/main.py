"""Entry point: python -m bits_jax.main --config=configs/<name>.py[:preset] --workdir=DIR.

Config values are overridden from the command line, e.g. `--config.total_steps=100`.
Running the same command again with the same workdir resumes from the latest checkpoint.
On several processes (TPU pod slice, multi-node GPU) every process runs the same command;
see `bits_jax/distributed.py` for how they find each other (`--coordinator_address`,
`--num_processes`, `--process_id` where JAX cannot detect the cluster).

Exit status: 0 done; 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun to resume);
78 invalid config or a refused config change on resume; 73 workdir locked, read-only or full,
or a checkpoint write failed; 65 stopped on non-finite loss/gradients (last checkpoint intact).
"""

import os
import sys

# TensorFlow feeds the input pipeline only: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA:CPU already runs the step on every core; a multi-threaded OpenBLAS inside it (the
# coding rate's Cholesky) competes with those threads: 1024x1024 took 948 ms instead of 32.
# Read when numpy/jaxlib load OpenBLAS, so it is set before any import of them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app
from absl import flags
from absl import logging
import jax

from bits_jax import checkpoint
from bits_jax import config_validation
from bits_jax import distributed
from bits_jax import run_guard
from bits_jax import train
from bits_jax import utils

_CONFIG = utils.define_config_flag("Experiment config file (configs/*.py[:preset]).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, results (local or any epath: gs://...)."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
    "auto: start jax.distributed on a detected TPU pod / SLURM / Open MPI job or when "
    "--coordinator_address is given; on: always; off: single process.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0 (multi-process runs JAX cannot detect; also JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, N).")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bits_jax", "xla"
    ),
    "Persistent XLA compilation cache: a rerun (or resume) of the same config loads the "
    "compiled train step instead of compiling it again. '' disables it.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  utils.quiet_absl_logging()
  if _COMPILATION_CACHE_DIR.value:  # before the first compilation reads the setting
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE_DIR.value)
  try:
    args = distributed.args_from(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:  # inconsistent process-group flags: a usage error, no traceback
    raise app.UsageError(str(e)) from e
  distributed.initialize(_DISTRIBUTED.value, args)
  logging.info("JAX devices: %s (%s)", jax.devices(), distributed.describe())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except run_guard.Preempted as e:
    _exit(run_guard.EXIT_PREEMPTED, str(e))
  except (config_validation.ConfigError, checkpoint.CheckpointMismatchError) as e:
    _exit(run_guard.EXIT_CONFIG, str(e))
  except (run_guard.WorkdirError, checkpoint.CheckpointWriteError) as e:
    _exit(run_guard.EXIT_WORKDIR, str(e))
  except run_guard.NonFiniteError as e:
    _exit(run_guard.EXIT_NONFINITE, str(e))


def _exit(status: int, message: str) -> None:
  """The message (once, on stderr, no traceback), then the exit status that names the case."""
  print(message, file=sys.stderr, flush=True)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=utils.parse_flags)
