"""The train step: a pure function of (state, batch), jitted over the device mesh.

The batch is split over the mesh's ('data', 'fsdp') axes; params, their EMA teacher and the
optimizer state are placed by the partition rules (`bits_jax/sharding.py`: replicated, or
large arrays split over `fsdp`). Losses see global arrays, so batch statistics (coding rate,
messages) are over the global batch whatever the mesh, unless an objective asks for
per-device statistics (`batch_shards`: the devices the batch is split over, in contiguous
blocks). With `grad_accum_steps > 1` they are over each (global) micro-batch instead.

The student's forward passes get a per-step rng stream "drop_path" (stochastic depth: the
ViT drops residual branches only when called with train=True and this stream); the teacher
never does. With `config.log_term_grad_norms`, the logged steps also report the gradient
norm of each loss term (`grad_norm/<term>` over the student, `grad_norm/<term>_backbone`
over the backbone): one extra backward pass through the shared forward (a vjp with a second
cotangent), on those steps only (a `lax.cond`); NaN on the others.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bits_jax import optim
from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import utils
from bits_jax.objectives import common as objectives_common
from bits_jax.train_state import Components, TrainState

# Folded into the per-step key for the student's drop-path masks (head resets use 7).
_DROP_PATH_SALT = 0x6470
# XLA:CPU option that turns the YNNPACK dot fusions off (config.xla_cpu_ynn_fusion=False).
CPU_NO_YNN_FUSION = {"xla_cpu_experimental_ynn_fusion_type": ""}


def drop_path_key(state: TrainState, micro_batch=0) -> jax.Array:
  """The student's drop-path key of this step (and micro-batch); never the teacher's."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _DROP_PATH_SALT)
  return jax.random.fold_in(key, micro_batch)


def logit_grad_norms(objective_loss: Callable, logits: jax.Array) -> dict:
  """{'grad_norm/<term>_logits'}: each loss term's gradient norm wrt the student's outputs.

  Every term reaches the parameters through the same network Jacobian from the outputs
  `[views, batch, dim]`, so their ratio here shows the balance of the terms on every step for
  the price of the loss's own backward (the per-parameter norms, `log_term_grad_norms`, need
  a backward through the network per term). Empty for objectives with fewer than two terms.
  """
  terms = jax.eval_shape(objective_loss, logits)[1][1].get(objectives_common.LOSS_TERMS)
  if not terms or len(terms) < 2:
    return {}
  names = list(terms)
  stacked = lambda o: jnp.stack(
      [objective_loss(o)[1][1][objectives_common.LOSS_TERMS][k] for k in names]
  )
  _, vjp_fn = jax.vjp(stacked, logits)
  eye = jnp.eye(len(names), dtype=jnp.float32)
  return {
      f"grad_norm/{name}_logits": jax.lax.stop_gradient(optax.tree.norm(vjp_fn(eye[i])[0]))
      for i, name in enumerate(names)
  }


def loss_and_grads(
    state: TrainState,
    batch: dict,
    components: Components,
    config,
    *,
    batch_shards: int = 1,
    micro_batch=0,
    term_grads_now=None,
):
  """(loss, new non-trained state, metrics, grads wrt the student) on one (micro-)batch.

  The non-trained state is {'objective_state', 'batch_stats', 'teacher_batch_stats'}.
  Student and teacher run in train mode: a BatchNorm backbone normalizes with the (global)
  batch statistics and updates its running averages, the student once per crop resolution
  (global, then local crops, as DINO's multi-crop wrapper does), the teacher on the global
  crops only. `batch_shards` goes to the objective; `micro_batch` (an index) varies the
  drop-path masks across micro-batches.

  `term_grads_now` (a bool scalar, or None = never): when the objective reports two or more
  loss terms (`objectives.common.LOSS_TERMS`), metrics['term_grads'] is {term: its gradient
  wrt the student} (zeros while `term_grads_now` is false). None, or a single term: plain
  `value_and_grad`, no such entry.
  """
  student = components.student
  key = drop_path_key(state, micro_batch)

  def apply(params, batch_stats, views, rngs=None):
    out, updated = student.apply(
        {"params": params, "batch_stats": batch_stats},
        views,
        train=True,
        mutable=["batch_stats"],
        rngs=rngs,
    )
    return out, updated.get("batch_stats", batch_stats)

  teacher_out, teacher_batch_stats = apply(
      state.teacher_params, state.teacher_batch_stats, batch["global"]
  )
  teacher_out = jax.lax.stop_gradient(teacher_out)

  def loss_fn(params):
    out, batch_stats = apply(
        params, state.batch_stats, batch["global"], {"drop_path": jax.random.fold_in(key, 0)}
    )
    if "local" in batch:
      local_out, batch_stats = apply(
          params, batch_stats, batch["local"], {"drop_path": jax.random.fold_in(key, 1)}
      )
      out = jnp.concatenate([out, local_out], axis=0)

    def objective_loss(student_out):
      return components.objective.loss(
          student_out,
          teacher_out,
          state.objective_state,
          step=state.step,
          config=config,
          batch_shards=batch_shards,
      )

    loss, (objective_state, metrics) = objective_loss(out)
    metrics.update(logit_grad_norms(objective_loss, jax.lax.stop_gradient(out)))
    return loss, (objective_state, batch_stats, metrics)

  probe = None
  if term_grads_now is not None:
    probe = jax.eval_shape(loss_fn, state.params)[1][2].get(objectives_common.LOSS_TERMS)
  if not probe or len(probe) < 2:
    (loss, (objective_state, batch_stats, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    metrics.pop(objectives_common.LOSS_TERMS, None)
  else:
    names = list(probe)

    def terms_fn(params):
      loss, (objective_state, batch_stats, metrics) = loss_fn(params)
      terms = metrics.pop(objectives_common.LOSS_TERMS)
      return jnp.stack([terms[k] for k in names]), (loss, objective_state, batch_stats, metrics)

    _, vjp_fn, (loss, objective_state, batch_stats, metrics) = jax.vjp(
        terms_fn, state.params, has_aux=True
    )
    (grads,) = vjp_fn(jnp.ones((len(names),), jnp.float32))

    def per_term():
      # The last term's gradient is the rest of the total: one extra backward for two terms.
      out = {
          name: vjp_fn(jnp.zeros((len(names),), jnp.float32).at[i].set(1.0))[0]
          for i, name in enumerate(names[:-1])
      }
      others = jax.tree_util.tree_map(lambda *g: sum(g), *out.values())
      out[names[-1]] = jax.tree_util.tree_map(jnp.subtract, grads, others)
      return out

    zeros = lambda: {n: jax.tree_util.tree_map(jnp.zeros_like, grads) for n in names}
    metrics["term_grads"] = jax.lax.cond(term_grads_now, per_term, zeros)
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


def accumulated_loss_and_grads(
    state: TrainState,
    batch: dict,
    components: Components,
    config,
    *,
    batch_shards: int = 1,
    term_grads_now=None,
):
  """`loss_and_grads` averaged over `config.grad_accum_steps` micro-batches (a lax.scan).

  Gradients, loss and metrics are means over equal micro-batches, so every batch-mean term
  (the cross-view BCE) gives exactly the gradient of one big batch. Batch statistics are
  per micro-batch: the coding rate and the bit statistics see one micro-batch of
  `batch_size / grad_accum_steps` rows (global over all devices), not the full batch. Each
  micro-batch starts from the step's objective state and the new state is the mean of the
  micro-batch results (integer leaves: the last), which equals one big-batch update for
  states that move linearly with a batch mean (e.g. an EMA center). BatchNorm running
  averages are handled the same way (normalization uses each micro-batch's statistics).
  Per-term gradients (metrics['term_grads']) are averaged like the gradients.
  """
  num = int(config.optim.grad_accum_steps)
  kwargs = dict(batch_shards=batch_shards, term_grads_now=term_grads_now)
  if num == 1:
    return loss_and_grads(state, batch, components, config, **kwargs)

  def body(carry, inputs):
    index, micro_batch = inputs
    loss, objective_state, metrics, grads = loss_and_grads(
        state, micro_batch, components, config, micro_batch=index, **kwargs
    )
    sums = {"grads": grads}
    if "term_grads" in metrics:
      sums["term_grads"] = metrics.pop("term_grads")
    if carry is None:
      return sums, (loss, objective_state, metrics)
    return jax.tree_util.tree_map(jnp.add, carry, sums), (loss, objective_state, metrics)

  micro_batches = split_micro_batches(batch, num)
  first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
  # The carry's structure (with or without per-term gradients) from a shape-only trace.
  template = jax.eval_shape(lambda b: body(None, (0, b))[0], first)
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), template)
  sums, (losses, objective_states, metrics) = jax.lax.scan(
      body, zeros, (jnp.arange(num), micro_batches)
  )
  mean = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating) else x[-1], tree
  )
  metrics = mean(metrics)
  sums = jax.tree_util.tree_map(lambda g: g / num, sums)
  if "term_grads" in sums:
    metrics["term_grads"] = sums["term_grads"]
  return jnp.mean(losses), mean(objective_states), metrics, sums["grads"]


def term_grad_norms(term_grads: dict, logged) -> dict:
  """{'grad_norm/<term>': over the student, 'grad_norm/<term>_backbone'}; NaN if not `logged`."""
  norms = {}
  for name, grads in term_grads.items():
    for suffix, tree in (("", grads), ("_backbone", grads["backbone"])):
      norms[f"grad_norm/{name}{suffix}"] = jnp.where(logged, optax.tree.norm(tree), jnp.nan)
  return norms


def is_logged_step(step, config) -> jax.Array:
  """Whether the train loop writes the metrics of the update that starts at `step`."""
  done = step + 1
  return (done % max(int(config.log_every), 1) == 0) | (done == config.total_steps)


def make_train_step(components: Components, config, *, batch_shards: int = 1) -> Callable:
  """`train_step(state, batch) -> (state, metrics)`, a pure function closed over `components`.

  `batch`: {'global': [batch, G, S, S, C], optional 'local': [batch, L, s, s, C]}; metrics are
  scalars, and [bits] histograms. The objective decides what must not move yet
  (`components.frozen`); the head is re-initialised every `components.head_reset_every`
  steps. `batch_shards`: the devices the batch is split over (in contiguous blocks), for
  per-device statistics.
  """
  schedules, optimizer, frozen = components.schedules, components.optimizer, components.frozen
  log_terms = bool(config.get("log_term_grad_norms", False))

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if components.head_reset_every:
      state = jax.lax.cond(
          train_state_lib.head_reset_due(state.step, components),
          lambda s: train_state_lib.reset_head(s, components),
          lambda s: s,
          state,
      )
    step = state.step
    logged = is_logged_step(step, config) if log_terms else None
    loss, new_states, metrics, grads = accumulated_loss_and_grads(
        state, batch, components, config, batch_shards=batch_shards, term_grads_now=logged
    )
    if "term_grads" in metrics:
      metrics.update(term_grad_norms(metrics.pop("term_grads"), logged))
    lr = schedules.learning_rate(step)
    wd = schedules.weight_decay(step)
    momentum = schedules.teacher_momentum(step)
    opt_state = optim.set_hyperparams(state.opt_state, lr, wd)
    updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
    if frozen is not None:  # no move and no Adam state change while frozen (FrozenParams)
      updates = frozen.mask(updates, step)
      new_opt_state = optim.replace_group(
          new_opt_state, opt_state, optim.FROZEN_GROUP, when=step < frozen.steps
      )
    opt_state = new_opt_state
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


def num_batch_shards(mesh) -> int:
  """Devices the batch is split over: the product of the mesh's batch axes."""
  return int(np.prod([mesh.shape[a] for a in sharding_lib.batch_axes(mesh)]))


def compiler_options(config, mesh) -> dict | None:
  """XLA options of the train-step compilation: YNN fusions off on CPU meshes unless
  `config.xla_cpu_ynn_fusion`; None (XLA's defaults) on GPU/TPU."""
  on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
  if on_cpu and not config.get("xla_cpu_ynn_fusion", True):
    return dict(CPU_NO_YNN_FUSION)
  return None


def compile_train_step(components: Components, config, mesh, state_sharding) -> Callable:
  """The train step jitted over `mesh`: batch split on ('data', 'fsdp'), state donated.

  `state_sharding`: the train state's shardings (`sharding.shardings_of`). Donating the
  state lets XLA update it in place, so peak memory holds about one state.
  """
  return jax.jit(
      make_train_step(components, config, batch_shards=num_batch_shards(mesh)),
      in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,),
      compiler_options=compiler_options(config, mesh),
  )
