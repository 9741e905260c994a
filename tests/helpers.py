"""Shared test utilities."""

import os

import numpy as np

from bits_jax import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int | None = None) -> str:
  """The session's XLA_FLAGS (conftest's and the user's) for a subprocess: `devices` fake CPU
  devices, or the real count when None."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def load_config(name: str, arg: str = ""):
  """`get_config(arg)` of configs/<name>.py."""
  return utils.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else "")
  )


def input_config(crops: dict, seed: int = 0, /, **overrides):
  """base_config() with a tiny input section: batch 4, shuffle buffer 16, `crops`; then
  `overrides`, config.input keys (nested as dicts: `crops=dict(num_local=0)` merges)."""
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top

  config = config_defaults.base_config()
  config.seed = seed
  config.input.update(dict(batch_size=4, eval_batch_size=4, shuffle_buffer=16, crops=crops))
  config.input.update(overrides)
  return config


def random_batch(config, seed: int = 0):
  """A synthetic multi-crop batch with the pipeline's structure."""
  rng = np.random.RandomState(seed)
  b, c, crops = config.input.batch_size, config.input.num_channels, config.input.crops
  batch = {
      "global": (
          rng.randn(b, crops.num_global, crops.global_size, crops.global_size, c).astype(np.float32)
      )
  }
  if crops.num_local:
    batch["local"] = rng.randn(b, crops.num_local, crops.local_size, crops.local_size, c).astype(
        np.float32
    )
  return batch


def create_state(config, mesh=None):
  """(components, state) of `config`, the state placed on `mesh` when given."""
  import jax  # pylint: disable=g-import-not-at-top
  from bits_jax import sharding  # pylint: disable=g-import-not-at-top
  from bits_jax import train_state  # pylint: disable=g-import-not-at-top

  components = train_state.build(config)
  key = jax.random.PRNGKey(config.seed)
  if mesh is None:
    return components, train_state.create(components, config, key)
  target = sharding.abstract_state(components, config, mesh)
  init = jax.jit(
      lambda: train_state.create(components, config, key),
      out_shardings=sharding.shardings_of(target),
  )
  return components, init()


def failing_evaluator() -> str:
  """Registers (once per process) an evaluator type that always raises; returns its name."""
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top

  name = "test_always_fails"
  try:
    common.get(name)
  except ValueError:

    @common.register(name)
    def _fails(ctx):  # pylint: disable=unused-variable
      del ctx
      raise RuntimeError("evaluator broke")

  return name
