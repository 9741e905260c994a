"""Optimizer, schedules and parameter groups, built once from `config.optim`.

AdamW per parameter group ('backbone', 'head', and 'frozen' for head params an objective
freezes at the start, see `objectives.common.FrozenParams`), so a head re-initialisation
resets exactly the head's moments and bias-correction counts; learning rate and weight decay
are injected hyperparameters set from the global step before every update. Weight decay
applies to every parameter of 2 or more dimensions (kernels, and the position embedding and
CLS token as in DINO's / SimDINO's code, unless `optim.decay_embeddings=False`), not to
biases or norms.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bits_jax import utils

PyTree = Any
GROUPS = ("backbone", "head")
CLIP_MODES = ("per_tensor", "global")
FROZEN_GROUP = "frozen"
HEAD_GROUPS = ("head", FROZEN_GROUP)  # what a head re-initialisation resets
_NO_DECAY = ("pos_embed", "cls_token")


@dataclasses.dataclass(frozen=True)
class Schedules:
  """Functions of the global step."""

  learning_rate: optax.Schedule
  weight_decay: optax.Schedule
  teacher_momentum: optax.Schedule


def make_schedules(config) -> Schedules:
  """Warm-up + cosine learning rate, cosine weight decay and teacher momentum (to its end)."""
  optim, total = config.optim, config.total_steps
  learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.learning_rate,
      warmup_steps=optim.warmup_steps,
      decay_steps=max(total, optim.warmup_steps + 1),
      end_value=optim.end_learning_rate,
  )
  if optim.weight_decay == 0:  # 0 -> end: optax's alpha = end / start is undefined
    rise = optax.cosine_decay_schedule(init_value=optim.weight_decay_end, decay_steps=max(total, 1))
    weight_decay = lambda step: optim.weight_decay_end - rise(step)
  else:
    weight_decay = optax.cosine_decay_schedule(
        init_value=optim.weight_decay,
        decay_steps=max(total, 1),
        alpha=optim.weight_decay_end / optim.weight_decay,
    )
  # Cosine from teacher_momentum to teacher_momentum_end (DINO: 0.996 -> 1).
  start, end = optim.teacher_momentum, optim.teacher_momentum_end
  gap = optax.cosine_decay_schedule(init_value=end - start, decay_steps=max(total, 1))
  return Schedules(learning_rate, weight_decay, lambda step: end - gap(step))


def decay_mask(params: PyTree, decay_embeddings: bool = True) -> PyTree:
  """True for the leaves weight decay applies to: >= 2 dimensions (DINO's rule: not biases,
  not norms), without `_NO_DECAY` (position embedding, CLS token) if not `decay_embeddings`."""

  def decays(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and (decay_embeddings or name not in _NO_DECAY)

  return jax.tree_util.tree_map_with_path(decays, params)


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
  """Every gradient tensor g scaled by min(1, max_norm / (||g|| + 1e-6)) on its own.

  DINO's and SimDINO's `clip_gradients` (the paper's code base, so its Tab. 12 clip values
  mean this), where `optax.clip_by_global_norm` bounds the norm of all of them together.
  """

  def update(updates, params=None):
    del params
    return jax.tree_util.tree_map(
        lambda g: g * jnp.minimum(1.0, max_norm / (optax.tree.norm(g) + 1e-6)).astype(g.dtype),
        updates,
    )

  return optax.stateless(update)


def make_gradient_clip(optim) -> optax.GradientTransformation:
  """`optim.clip_norm` (0: none) applied as `optim.clip_mode` says."""
  if not optim.clip_norm:
    return optax.identity()
  if optim.clip_mode not in CLIP_MODES:
    raise ValueError(f"config.optim.clip_mode={optim.clip_mode!r}: use one of {CLIP_MODES}.")
  if optim.clip_mode == "global":
    return optax.clip_by_global_norm(optim.clip_norm)
  return clip_each_by_norm(optim.clip_norm)


def make_optimizer(config, frozen=None) -> optax.GradientTransformation:
  """Clipping + one AdamW per parameter group, hyperparameters injected.

  Groups: `GROUPS` (the params' top-level keys), and `FROZEN_GROUP` for the leaves `frozen`
  (an `objectives.common.FrozenParams`, or None) selects.
  """
  optim = config.optim
  groups = GROUPS + ((FROZEN_GROUP,) if frozen is not None else ())

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FROZEN_GROUP
        if frozen is not None and frozen.selects(path)
        else path[0].key,
        params,
    )

  def group():
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0,
        weight_decay=0.0,
        b1=optim.b1,
        b2=optim.b2,
        mask=functools.partial(decay_mask, decay_embeddings=bool(optim.decay_embeddings)),
    )

  return optax.chain(
      make_gradient_clip(optim), optax.multi_transform({g: group() for g in groups}, labels)
  )


def set_hyperparams(opt_state: PyTree, learning_rate, weight_decay) -> PyTree:
  """The injected learning rate and weight decay of every group set to these values."""
  return optax.tree_utils.tree_set(
      opt_state,
      learning_rate=jnp.asarray(learning_rate, jnp.float32),
      weight_decay=jnp.asarray(weight_decay, jnp.float32),
  )


def replace_group(opt_state: PyTree, source: PyTree, group: str, when: Any = True) -> PyTree:
  """`opt_state` with the leaves of one parameter group taken from `source` (same structure).

  `source` is e.g. a fresh `optimizer.init(params)` (a reset) or the state before an update
  (a hold); `when` is a traced bool that selects between the two (default: always). A group
  the optimizer does not have leaves `opt_state` as it is.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, old, new: jnp.where(when, new, old) if utils.under_key(path, group) else old,
      opt_state,
      source,
  )
