"""The train step: a pure function of (state, batch), jitted over the device mesh.

The batch is split over the mesh's `data` axis; params, optimizer state and teacher are
replicated. Losses see global arrays, so batch statistics (coding rate, messages) are over
the global batch whatever the number of devices.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bits_jax import sharding as sharding_lib
from bits_jax.train_state import (Student, TrainState, build_models, head_reinit_due,
                                  learning_rate_schedule, make_optimizer, reinit_head,
                                  set_hyperparams, teacher_momentum_schedule,
                                  weight_decay_schedule)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch: dict, *, config) -> tuple[TrainState, dict]:
  """One update. Pure: a function of (state, batch) only.

  Args:
    state: the TrainState.
    batch: {'global': [batch, G, S, S, C], optional 'local': [batch, L, s, s, C]}.
  Returns:
    (new_state, metrics) with scalar metrics.
  """
  state = jax.lax.cond(head_reinit_due(state.step, config),
                       lambda s: reinit_head(s, config), lambda s: s, state)
  backbone, head, objective = build_models(config)
  student = Student(backbone, head)
  step = state.step

  teacher_out = jax.lax.stop_gradient(
      student.apply({"params": state.teacher_params}, batch["global"]))

  def loss_fn(params):
    out = student.apply({"params": params}, batch["global"])
    if "local" in batch:
      out = jnp.concatenate(
          [out, student.apply({"params": params}, batch["local"])], axis=0)
    return objective.loss(out, teacher_out, state.objective_state, step=step, config=config)

  (loss, (objective_state, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)

  lr = learning_rate_schedule(config)(step)
  wd = weight_decay_schedule(config)(step)
  momentum = teacher_momentum_schedule(config)(step)
  tx = make_optimizer(config)
  opt_state = set_hyperparams(state.opt_state, lr, wd)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  teacher = optax.incremental_update(params, state.teacher_params, 1.0 - momentum)

  # A non-finite loss or gradient skips the update instead of poisoning the params.
  finite = jnp.isfinite(loss) & _all_finite(grads)
  keep = lambda new, old: jax.tree_util.tree_map(
      lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=step + 1,
      params=keep(params, state.params),
      teacher_params=keep(teacher, state.teacher_params),
      opt_state=keep(opt_state, state.opt_state),
      objective_state=keep(objective_state, state.objective_state),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  metrics = dict(metrics, learning_rate=lr, weight_decay=wd, teacher_momentum=momentum,
                 grad_norm=optax.tree.norm(grads), update_skipped=(~finite).astype(jnp.float32))
  return new_state, metrics


def compile_train_step(config, mesh, state_sharding) -> Callable:
  """`train_step` jitted over `mesh`: batch split on `data`, state donated."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return jax.jit(
      functools.partial(train_step, config=config),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,))
