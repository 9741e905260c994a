"""The train step: a pure function of (state, batch), jitted over the device mesh.

The batch is split over the mesh's ('data', 'fsdp') axes; params, their EMA teacher and the
optimizer state are placed by the partition rules (`bits_jax/sharding.py`: replicated, or
large arrays split over `fsdp`). Losses see global arrays, so batch statistics (coding rate,
messages) are over the global batch whatever the mesh: there is no per-device approximation.
With `grad_accum_steps > 1` they are over each (global) micro-batch instead.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bits_jax import optim
from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import utils
from bits_jax.train_state import Components, TrainState


def loss_and_grads(state: TrainState, batch: dict, components: Components, config):
  """(loss, new non-trained state, metrics, grads wrt the student) on one (micro-)batch.

  The non-trained state is {'objective_state', 'batch_stats', 'teacher_batch_stats'}.
  Student and teacher run in train mode: a BatchNorm backbone normalizes with the (global)
  batch statistics and updates its running averages, the student once per crop resolution
  (global, then local crops, as DINO's multi-crop wrapper does), the teacher on the global
  crops only.
  """
  student = components.student

  def apply(params, batch_stats, views):
    out, updated = student.apply(
        {"params": params, "batch_stats": batch_stats}, views, train=True, mutable=["batch_stats"]
    )
    return out, updated.get("batch_stats", batch_stats)

  teacher_out, teacher_batch_stats = apply(
      state.teacher_params, state.teacher_batch_stats, batch["global"]
  )
  teacher_out = jax.lax.stop_gradient(teacher_out)

  def loss_fn(params):
    out, batch_stats = apply(params, state.batch_stats, batch["global"])
    if "local" in batch:
      local_out, batch_stats = apply(params, batch_stats, batch["local"])
      out = jnp.concatenate([out, local_out], axis=0)
    loss, (objective_state, metrics) = components.objective.loss(
        out, teacher_out, state.objective_state, step=state.step, config=config
    )
    return loss, (objective_state, batch_stats, metrics)

  (loss, (objective_state, batch_stats, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  new_states = {
      "objective_state": objective_state,
      "batch_stats": batch_stats,
      "teacher_batch_stats": jax.lax.stop_gradient(teacher_batch_stats),
  }
  return loss, new_states, metrics, grads


def split_micro_batches(batch: dict, num: int) -> dict:
  """`[B, ...] -> [num, B / num, ...]`; micro-batch j holds rows j, j + num, j + 2 num, ...

  Strided rows keep data where it is: the batch is split over devices in contiguous blocks
  of B / n rows, so (with B / n divisible by num) every device already holds its
  B / (n num) rows of every micro-batch.
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(
          f"batch of {x.shape[0]} rows is not divisible by "
          f"grad_accum_steps={num}: change batch_size or grad_accum_steps."
      )
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)

  return jax.tree_util.tree_map(split, batch)


def accumulated_loss_and_grads(state: TrainState, batch: dict, components: Components, config):
  """`loss_and_grads` averaged over `config.grad_accum_steps` micro-batches (a lax.scan).

  Gradients, loss and metrics are means over equal micro-batches, so every batch-mean term
  (the cross-view BCE) gives exactly the gradient of one big batch. Batch statistics are
  per micro-batch: the coding rate and the bit statistics see one micro-batch of
  `batch_size / grad_accum_steps` rows (global over all devices), not the full batch. Each
  micro-batch starts from the step's objective state and the new state is the mean of the
  micro-batch results (integer leaves: the last), which equals one big-batch update for
  states that move linearly with a batch mean (e.g. an EMA center). BatchNorm running
  averages are handled the same way (normalization uses each micro-batch's statistics).
  """
  num = int(config.optim.grad_accum_steps)
  if num == 1:
    return loss_and_grads(state, batch, components, config)

  def body(grad_sum, micro_batch):
    loss, objective_state, metrics, grads = loss_and_grads(state, micro_batch, components, config)
    return jax.tree_util.tree_map(jnp.add, grad_sum, grads), (loss, objective_state, metrics)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  grad_sum, (losses, objective_states, metrics) = jax.lax.scan(
      body, zeros, split_micro_batches(batch, num)
  )
  mean = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating) else x[-1], tree
  )
  grads = jax.tree_util.tree_map(lambda g: g / num, grad_sum)
  return jnp.mean(losses), mean(objective_states), mean(metrics), grads


def make_train_step(components: Components, config) -> Callable:
  """`train_step(state, batch) -> (state, metrics)`, a pure function closed over `components`.

  `batch`: {'global': [batch, G, S, S, C], optional 'local': [batch, L, s, s, C]}; metrics are
  scalars. The objective decides when the head is re-initialised and what must not move yet.
  """
  objective, schedules, optimizer = (
      components.objective,
      components.schedules,
      components.optimizer,
  )

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if components.head_reset_every:
      state = jax.lax.cond(
          train_state_lib.head_reset_due(state.step, components),
          lambda s: train_state_lib.reset_head(s, components),
          lambda s: s,
          state,
      )
    step = state.step
    loss, new_states, metrics, grads = accumulated_loss_and_grads(state, batch, components, config)
    grads = objective.mask_updates(grads, step, config)
    lr = schedules.learning_rate(step)
    wd = schedules.weight_decay(step)
    momentum = schedules.teacher_momentum(step)
    opt_state = optim.set_hyperparams(state.opt_state, lr, wd)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    updates = objective.mask_updates(updates, step, config)
    params = optax.apply_updates(state.params, updates)
    teacher = optax.incremental_update(params, state.teacher_params, 1.0 - momentum)

    # A non-finite loss or gradient skips the update instead of poisoning the params.
    finite = jnp.isfinite(loss) & utils.tree_all_finite(grads)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=step + 1,
        params=keep(params, state.params),
        teacher_params=keep(teacher, state.teacher_params),
        opt_state=keep(opt_state, state.opt_state),
        objective_state=keep(new_states["objective_state"], state.objective_state),
        batch_stats=keep(new_states["batch_stats"], state.batch_stats),
        teacher_batch_stats=keep(new_states["teacher_batch_stats"], state.teacher_batch_stats),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    metrics = dict(
        metrics,
        learning_rate=lr,
        weight_decay=wd,
        teacher_momentum=momentum,
        grad_norm=optax.tree.norm(grads),
        update_skipped=(~finite).astype(jnp.float32),
    )
    return new_state, metrics

  return train_step


def compile_train_step(components: Components, config, mesh, state_sharding) -> Callable:
  """The train step jitted over `mesh`: batch split on ('data', 'fsdp'), state donated.

  `state_sharding`: the train state's shardings (`sharding.state_shardings`). Donating the
  state lets XLA update it in place, so peak memory holds about one state.
  """
  return jax.jit(
      make_train_step(components, config),
      in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,),
  )
