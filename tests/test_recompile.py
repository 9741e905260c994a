"""The train step compiles once: no recompilation over steps with a head re-init and logging."""

import collections

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

from bits_jax import train
from tests import helpers

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _set_head_reset_every(config, steps: int) -> None:
  """BITS-reset period, wherever this config tree keeps it (objective.head or .bits)."""
  for group in (config.objective.head, config.objective.bits):
    if "reset_every_steps" in group:
      group.reset_every_steps = steps
      if "reset_every_epochs" in group:
        group.reset_every_epochs = 0


@pytest.fixture
def compiles():
  """A Counter of XLA compilations by function name ('jit(train_step)'), while the test runs.

  The persistent compilation cache is off meanwhile: a program another test compiled would
  load from it without a backend compilation to count.
  """
  counts = collections.Counter()
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # it remembers whether it is used

  def listener(event, duration, **kwargs):
    del duration
    if event == _COMPILE_EVENT:
      counts[kwargs.get("fun_name", "?")] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield counts
  jax.monitoring.unregister_event_duration_listener(listener)
  jax.config.update("jax_enable_compilation_cache", enabled)
  compilation_cache.reset_cache()


def test_train_loop_compiles_the_step_once(compiles, tmp_path):
  config = helpers.load_config("fashion_mnist", "test")
  config.total_steps = 5
  config.log_every = 2  # host reads of the metrics at steps 2, 4 and 5
  config.checkpoint_every = 5
  _set_head_reset_every(config, 2)  # the re-init branch is taken at steps 2 and 4
  for entry in config.evals.values():
    entry.every = 0
  state = train.train(config, str(tmp_path / "run"))
  assert int(state.step) == 5
  # Retracing or a changed input (sharding, dtype, weak type) would compile it again.
  assert compiles["jit(train_step)"] == 1, dict(compiles)
