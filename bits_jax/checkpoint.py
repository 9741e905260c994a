"""Orbax checkpointing of the train state."""
import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from bits_jax import sharding as sharding_lib
from bits_jax.train_state import TrainState, create_train_state


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def abstract_state(config, mesh):
  """Shapes, dtypes and shardings of the train state on `mesh`, without allocating it.

  Shardings come from the partition rules for `mesh`, not from the checkpoint, so Orbax
  restores a checkpoint written on any mesh (other device count, FSDP or pure data
  parallel) straight into this mesh's layout.
  """
  shapes = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0)))
  shardings = sharding_lib.tree_shardings(shapes, mesh, config)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def initial_or_restored_state(config, mesh, manager) -> TrainState:
  """Restore the latest checkpoint if any, else a fresh state on the mesh."""
  target = abstract_state(config, mesh)
  latest = manager.latest_step()
  if latest is not None:
    logging.info("Restoring checkpoint at step %d from %s", latest, manager.directory)
    print(f"Resuming from checkpoint step {latest} in {manager.directory}", flush=True)
    return manager.restore(latest, args=ocp.args.StandardRestore(target))
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, target)
  init = jax.jit(lambda: create_train_state(config, jax.random.PRNGKey(config.seed)),
                 out_shardings=state_sharding)
  return init()
