"""The train state, the modules it is made of, and its creation (all pure).

The student is {'backbone', 'head'}; the teacher is an EMA of the student with the same
structure. All randomness and schedules are functions of the stored rng and step, so a
resumed run is identical to an uninterrupted one. `Components` (models, objective, optimizer,
schedules) are built once from the config, outside `jit`; the train step closes over them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bits_jax import models
from bits_jax import objectives
from bits_jax import optim
from bits_jax import utils

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates done
  params: PyTree  # student {'backbone': ..., 'head': ...}
  teacher_params: PyTree  # EMA of the student, same structure
  opt_state: PyTree
  objective_state: PyTree  # e.g. a DINO center; {} for BITS
  rng: jax.Array  # base key; per-step keys are fold_in(rng, step)
  skipped_steps: jax.Array  # int32: updates skipped for non-finite loss/grads
  # BatchNorm running averages ({'backbone': ...}; {} for a ViT). The teacher's are its
  # own: updated by its forward pass on the global views (train mode, as in DINO), not
  # copied or averaged from the student's, so they describe the EMA weights' activations.
  batch_stats: PyTree = flax.struct.field(default_factory=dict)
  teacher_batch_stats: PyTree = flax.struct.field(default_factory=dict)


class Student(nn.Module):
  """Backbone + projection head, applied view by view.

  `__call__(views: [batch, V, H, W, C]) -> head_out [V, batch, dim]`.
  """

  backbone: nn.Module
  head: nn.Module

  def __call__(self, views, train: bool = False):
    b, v = views.shape[:2]
    feats = self.backbone(views.reshape((b * v,) + views.shape[2:]), train=train)
    out = self.head(feats["cls"])
    return jnp.swapaxes(out.reshape((b, v) + out.shape[1:]), 0, 1)


@dataclasses.dataclass(frozen=True)
class Components:
  """What a run is made of, built once from the config."""

  backbone: nn.Module
  head: nn.Module
  objective: objectives.Objective
  optimizer: optax.GradientTransformation
  schedules: optim.Schedules
  image_shape: tuple[int, int, int]  # (global crop, global crop, channels)
  head_reset_every: int  # steps between head re-initialisations; 0 = never
  reset_head_optimizer: bool = True  # a head reset also resets the head's optimizer state
  frozen: objectives.FrozenParams | None = None  # head params fixed at the start (DINO)

  @property
  def student(self) -> Student:
    return Student(self.backbone, self.head)


def build(config, steps_per_epoch: int | None = None) -> Components:
  """The components of `config` (`steps_per_epoch` resolves `*_epochs` settings).

  Head resets (`config.objective.head.reset_every_*`) apply to any method.
  """
  objective = objectives.get(config.objective.name)
  frozen = objective.frozen_params(config)
  size = config.input.crops.global_size
  return Components(
      backbone=models.build_backbone(config),
      head=objective.make_head(config),
      objective=objective,
      optimizer=optim.make_optimizer(config, frozen),
      schedules=optim.make_schedules(config),
      image_shape=(size, size, config.input.num_channels),
      head_reset_every=utils.steps(config.objective.head, "reset_every", steps_per_epoch),
      reset_head_optimizer=bool(config.objective.head.reset_optimizer_state),
      frozen=frozen,
  )


def init_head_params(components: Components, key) -> PyTree:
  width = components.backbone.feature_dim
  return components.head.init(key, jnp.zeros((1, width), jnp.float32))["params"]


def init_variables(components: Components, key) -> tuple[PyTree, PyTree]:
  """Fresh student (params {'backbone', 'head'}, batch_stats) from `key`.

  batch_stats is {'backbone': running averages} for a BatchNorm backbone, else {}.
  """
  k_backbone, k_head = jax.random.split(key)
  variables = components.backbone.init(
      k_backbone, jnp.zeros((1,) + components.image_shape, jnp.float32)
  )
  params = {"backbone": variables["params"], "head": init_head_params(components, k_head)}
  batch_stats = {"backbone": variables["batch_stats"]} if variables.get("batch_stats") else {}
  return params, batch_stats


def random_init_variables(config, components: Components) -> dict:
  """The untrained model as evaluation variables {'backbone', 'head', 'batch_stats'?}.

  Seeded from `config.seed + 1`, so the baseline is not the trained run's own init.
  """
  params, batch_stats = init_variables(components, jax.random.PRNGKey(config.seed + 1))
  return dict(params, **({"batch_stats": batch_stats} if batch_stats else {}))


def backbone_variables(params: PyTree, batch_stats: PyTree) -> dict:
  """Flax variables of the backbone alone from student-shaped params / batch_stats."""
  variables = {"params": params["backbone"]}
  if batch_stats:
    variables["batch_stats"] = batch_stats["backbone"]
  return variables


def create(components: Components, config, key) -> TrainState:
  """Initial state: student == teacher, fresh optimizer, step 0."""
  params, batch_stats = init_variables(components, jax.random.fold_in(key, 0))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      teacher_params=params,
      opt_state=components.optimizer.init(params),
      objective_state=components.objective.init_state(config),
      rng=jax.random.fold_in(key, 1),
      skipped_steps=jnp.zeros((), jnp.int32),
      batch_stats=batch_stats,
      teacher_batch_stats=batch_stats,
  )


def reset_head(state: TrainState, components: Components) -> TrainState:
  """Student and teacher heads get the same fresh params (the head's init distribution).

  The head's optimizer state (Adam moments and count) is reset too unless
  `components.reset_head_optimizer` is False (the paper does not say which). The new head
  is drawn from fold_in(rng, step), so the re-init cycle is reproducible. Objective state
  (e.g. DINO's center) is kept.
  """
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 7)
  new_head = init_head_params(components, key)
  params = dict(state.params, head=new_head)
  opt_state = state.opt_state
  if components.reset_head_optimizer:
    fresh = components.optimizer.init(params)
    for group in optim.HEAD_GROUPS:
      opt_state = optim.replace_group(opt_state, fresh, group)
  return state.replace(
      params=params, teacher_params=dict(state.teacher_params, head=new_head), opt_state=opt_state
  )


def head_reset_due(step: jax.Array, components: Components) -> jax.Array:
  every = components.head_reset_every
  if not every:
    return jnp.zeros((), bool)
  return (step > 0) & (step % every == 0)
