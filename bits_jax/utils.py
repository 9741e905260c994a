"""Small helpers shared across the package: one home each."""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

PyTree = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def tree_all_finite(tree: PyTree) -> jax.Array:
  """bool scalar: every floating-point leaf of `tree` is finite (True for no such leaf)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def path_name(path) -> str:
  """'params/backbone/block0/attn/query/kernel' from a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def under_key(path, key: str) -> bool:
  """Whether a jax key path passes through the dict key `key`."""
  return any(getattr(p, "key", None) == key for p in path)


# ------------------------------------------------------------------ host <-> global arrays


def to_host(x: Any) -> np.ndarray:
  """numpy copy of `x`; global arrays spanning several processes are all-gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def to_global(x: Any, sharding: jax.sharding.NamedSharding, name: str = "batch") -> jax.Array:
  """This process's rows `x: [b, ...]` as one global array with `sharding` on the batch axis."""
  if isinstance(x, jax.Array):
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  x = np.asarray(x)
  n_local = len(sharding.addressable_devices)
  if x.shape[0] % n_local:
    raise ValueError(
        f"{name} has {x.shape[0]} rows, not divisible by the {n_local} local "
        "devices of the mesh: pad it to a multiple of the device count."
    )
  return jax.make_array_from_process_local_data(sharding, x)


def sync_processes(name: str) -> None:
  """A barrier over all processes (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------- configs


def steps(section, name: str, steps_per_epoch: int | None) -> int:
  """`section.<name>_steps`, or `section.<name>_epochs` converted to steps (big_vision style).

  At most one of the two may be non-zero; 0 means "never" / "none".
  """
  by_steps = section.get(f"{name}_steps", 0) or 0
  by_epochs = section.get(f"{name}_epochs", 0) or 0
  if by_steps and by_epochs:
    raise ValueError(
        f"both {name}_steps={by_steps} and {name}_epochs={by_epochs} are set: "
        "set one of them (the other to 0)."
    )
  if by_epochs:
    if not steps_per_epoch:
      raise ValueError(
          f"{name}_epochs={by_epochs} needs the number of training examples: "
          f"give {name}_steps instead."
      )
    return max(int(round(by_epochs * steps_per_epoch)), 1)
  return int(by_steps)


def load_config_file(spec: str):
  """The ConfigDict of 'path/to/config.py[:arg]' (as `--config=` accepts it)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} not found: pass --config=configs/NAME.py.")
  module_spec = importlib.util.spec_from_file_location(
      "bits_jax_config_" + os.path.splitext(os.path.basename(path))[0], path
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def define_config_flag(help_text: str, flag_values=None, sys_argv=None):
  """`--config=FILE.py[:arg]` with `--config.key=value` overrides, as every CLI takes it.

  Keys the file does not set may be given too (a backbone's or evaluator's option the preset
  leaves at its default, `--config.model.remat=True`): values parse as Python literals, and
  `bits_jax.config_validation` reports any key that is no option, with the closest one.
  `flag_values` / `sys_argv` (default: absl's FLAGS / sys.argv) are for tests.
  """
  return config_flags.DEFINE_config_file(
      "config",
      None,
      help_text,
      flag_values=flags.FLAGS if flag_values is None else flag_values,
      lock_config=False,
      accept_new_attributes=True,
      sys_argv=sys_argv,
  )


def parse_flags(argv):
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with an override under
  a section the config does not have (`--config.optm.lr=1`) reported the way absl reports
  the other flag errors (message, exit status 1), not as a KeyError traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    message = str(error.args[0]) if error.args else repr(error)
    sys.stderr.write(
        f"FATAL Flags parsing error: --config.* override of a missing section: {message}\n"
    )
    sys.exit(1)


def quiet_absl_logging() -> None:
  """Warnings and errors only, unless --verbosity was given (`--verbosity=0`: INFO again).

  absl turns INFO on under app.run, and Orbax alone prints several INFO lines per
  checkpoint saved or restored. For every CLI's main, after flag parsing.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _logged_to_stderr(level: int) -> bool:
  """Whether a record at `level` from absl's logger already reaches stderr."""
  logger = std_logging.getLogger("absl")
  if not logger.isEnabledFor(level):
    return False
  handlers, node = [], logger
  while node is not None:
    handlers += node.handlers
    node = node.parent if node.propagate else None
  if not handlers:  # Python's last-resort handler writes WARNING and up to stderr
    return level >= std_logging.lastResort.level
  for handler in handlers:
    # absl's handler writes through its python_handler (stderr unless a log file is used).
    stream = getattr(getattr(handler, "python_handler", handler), "stream", None)
    if stream in (sys.stderr, sys.__stderr__) and level >= handler.level:
      return True
  return False


def announce(message: str, *, warn: bool = True) -> None:
  """Logs `message` and shows it once on process 0's console.

  Faults (a damaged checkpoint moved aside, a lock taken over) must be seen in the run's
  output even when logs go to files; where absl already writes the record to stderr
  (`python -m bits_jax.main`), a print would show it twice.
  """
  level = std_logging.WARNING if warn else std_logging.INFO
  logging.log(logging.WARNING if warn else logging.INFO, "%s", message)
  if jax.process_index() == 0 and not _logged_to_stderr(level):
    print(message, flush=True)


# absl logs the line that called announce, not announce's own.
logging.ABSLLogger.register_frame_to_skip(__file__, "announce")
