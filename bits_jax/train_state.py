"""Train state, schedules, optimizer and head re-initialization (all pure).

The student is {'backbone', 'head'}; the teacher is an EMA of the student with the same
structure. All randomness and schedules are functions of the stored rng and step, so a
resumed run is identical to an uninterrupted one.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bits_jax import models
from bits_jax import objectives

PyTree = Any

_NO_DECAY = ("pos_embed", "cls_token")


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32 scalar: number of updates done
  params: PyTree               # student {'backbone': ..., 'head': ...}
  teacher_params: PyTree       # EMA of the student, same structure
  opt_state: PyTree
  objective_state: PyTree      # e.g. a DINO center; {} for BITS
  rng: jax.Array               # base key; per-step keys are fold_in(rng, step)
  skipped_steps: jax.Array     # int32: updates skipped for non-finite loss/grads
  # BatchNorm running averages ({'backbone': ...}; {} for a ViT). The teacher's are its
  # own: updated by its forward pass on the global views (train mode, as in DINO), not
  # copied or averaged from the student's, so they describe the EMA weights' activations.
  batch_stats: PyTree = flax.struct.field(default_factory=dict)
  teacher_batch_stats: PyTree = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------------------- schedules


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `min_learning_rate`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1),
      end_value=config.min_learning_rate)


def weight_decay_schedule(config) -> optax.Schedule:
  """Cosine from `weight_decay` to `weight_decay_end` (DINO: 0.04 -> 0.4)."""
  if config.weight_decay == 0:
    return optax.constant_schedule(config.weight_decay_end)
  return optax.cosine_decay_schedule(
      init_value=config.weight_decay, decay_steps=max(config.total_steps, 1),
      alpha=config.weight_decay_end / config.weight_decay)


def teacher_momentum_schedule(config) -> optax.Schedule:
  """Cosine from `teacher_momentum` to 1.0 over the run."""
  gap = optax.cosine_decay_schedule(
      init_value=1.0 - config.teacher_momentum, decay_steps=max(config.total_steps, 1))
  return lambda step: 1.0 - gap(step)


# ------------------------------------------------------------------------------- model


class Student(nn.Module):
  """Backbone + projection head, applied view by view.

  `__call__(views: [batch, V, H, W, C]) -> (head_out [V, batch, dim], backbone dict)`.
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, views, train: bool = False):
    b, v = views.shape[:2]
    feats = self.backbone(views.reshape((b * v,) + views.shape[2:]), train=train)
    out = self.head(feats["cls"])
    return jnp.swapaxes(out.reshape((b, v) + out.shape[1:]), 0, 1)


def build_models(config):
  """(backbone, head, objective) from config."""
  objective = objectives.get_objective(config.method)
  return models.build_backbone(config), objective.make_head(config), objective


def init_head_params(head: nn.Module, key, width: int):
  return head.init(key, jnp.zeros((1, width), jnp.float32))["params"]


def init_variables(config, key):
  """Fresh student (params {'backbone', 'head'}, batch_stats) from `key`.

  batch_stats is {'backbone': running averages} for a BatchNorm backbone, else {}.
  """
  backbone, head, _ = build_models(config)
  k_backbone, k_head = jax.random.split(key)
  image = jnp.zeros((1, config.global_crop_size, config.global_crop_size,
                     config.num_channels), jnp.float32)
  variables = backbone.init(k_backbone, image)
  params = {
      "backbone": variables["params"],
      "head": init_head_params(head, k_head, models.backbone_width(config)),
  }
  batch_stats = ({"backbone": variables["batch_stats"]} if variables.get("batch_stats")
                 else {})
  return params, batch_stats


def init_params(config, key):
  """Fresh student params {'backbone', 'head'} from `key`."""
  return init_variables(config, key)[0]


def backbone_variables(params, batch_stats) -> dict:
  """Flax variables of the backbone alone from student-shaped params / batch_stats."""
  variables = {"params": params["backbone"]}
  if batch_stats:
    variables["batch_stats"] = batch_stats["backbone"]
  return variables


# --------------------------------------------------------------------------- optimizer


def _decay_mask(params):
  def decays(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and name not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """Clipping + AdamW, one AdamW per parameter group ('backbone', 'head').

  Groups let a head re-initialization reset the head's moments and bias-correction count
  without touching the backbone's. Learning rate and weight decay are injected
  hyperparameters, set from the global step by `set_hyperparams` before every update.
  """
  def group():
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0, weight_decay=0.0, b1=config.adam_b1, b2=config.adam_b2,
        mask=_decay_mask)
  labels = {"backbone": "backbone", "head": "head"}
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0
      else optax.identity(),
      optax.multi_transform({"backbone": group(), "head": group()}, labels))


def set_hyperparams(opt_state, learning_rate, weight_decay):
  return optax.tree_utils.tree_set(
      opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32),
      weight_decay=jnp.asarray(weight_decay, jnp.float32))


def _under_key(path, key: str) -> bool:
  return any(getattr(p, "key", None) == key for p in path)


def freeze_last_layer(tree: PyTree, step, config) -> PyTree:
  """Zeros `tree['head']...['last_layer']` leaves while `step < freeze_last_layer_steps`.

  Applied to the gradients (so Adam's moments see nothing) and to the updates (so weight
  decay does not move the layer either): DINO keeps its prototypes fixed in the first epoch.
  A no-op for heads without a `last_layer` module and when the key is 0.
  """
  steps = config.get("freeze_last_layer_steps", 0)
  if not steps:
    return tree
  frozen = jnp.asarray(step) < steps
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.where(frozen, jnp.zeros_like(x), x)
      if _under_key(path, "head") and _under_key(path, "last_layer") else x, tree)


# ------------------------------------------------------------------------------- state


def create_train_state(config, key) -> TrainState:
  """Initial state: student == teacher, fresh optimizer, step 0."""
  params, batch_stats = init_variables(config, jax.random.fold_in(key, 0))
  _, _, objective = build_models(config)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      teacher_params=params,
      opt_state=make_optimizer(config).init(params),
      objective_state=objective.init_state(config),
      rng=jax.random.fold_in(key, 1),
      skipped_steps=jnp.zeros((), jnp.int32),
      batch_stats=batch_stats,
      teacher_batch_stats=batch_stats)


def reinit_head(state: TrainState, config) -> TrainState:
  """Give student and teacher heads the same fresh params; reset the head's optimizer state.

  The new head is drawn from fold_in(rng, step), so the re-init cycle is reproducible.
  """
  _, head, _ = build_models(config)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 7)
  new_head = init_head_params(head, key, models.backbone_width(config))
  params = dict(state.params, head=new_head)
  teacher = dict(state.teacher_params, head=new_head)
  fresh_opt = make_optimizer(config).init(params)
  opt_state = jax.tree_util.tree_map_with_path(
      lambda path, old, new: new if _under_key(path, "head") else old,
      state.opt_state, fresh_opt)
  return state.replace(params=params, teacher_params=teacher, opt_state=opt_state)


def head_reinit_due(step, config):
  every = config.head_reinit_every
  if not every:
    return jnp.zeros((), bool)
  return (step > 0) & (step % every == 0)
