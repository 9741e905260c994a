"""Self-distillation training: state, pure train step, and the loop.

The student is {'backbone', 'head'}; the teacher is an EMA of the student. The train step is a
pure function of (state, batch) compiled with `jax.jit` over a device mesh: the batch is split
over the `data` axis, params, optimizer state and teacher are replicated. All randomness and
all schedules are functions of the stored rng and step, so a resumed run is identical to an
uninterrupted one.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from bits_jax import models
from bits_jax import objectives
from bits_jax import sharding as sharding_lib

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

  def __call__(self, views):
    b, v = views.shape[:2]
    feats = self.backbone(views.reshape((b * v,) + views.shape[2:]))
    out = self.head(feats["cls"])
    return jnp.swapaxes(out.reshape((b, v) + out.shape[1:]), 0, 1)


def build_models(config):
  """(backbone, head, objective) from config."""
  objective = objectives.get_objective(config.method)
  return models.build_backbone(config), objective.make_head(config), objective


def init_head_params(head: nn.Module, key, width: int):
  return head.init(key, jnp.zeros((1, width), jnp.float32))["params"]


def init_params(config, key):
  """Fresh student params {'backbone', 'head'} from `key`."""
  backbone, head, _ = build_models(config)
  k_backbone, k_head = jax.random.split(key)
  image = jnp.zeros((1, config.global_crop_size, config.global_crop_size,
                     config.num_channels), jnp.float32)
  return {
      "backbone": backbone.init(k_backbone, image)["params"],
      "head": init_head_params(head, k_head, models.backbone_width(config)),
  }


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


# ------------------------------------------------------------------------------- state


def create_train_state(config, key) -> TrainState:
  """Initial state: student == teacher, fresh optimizer, step 0."""
  params = init_params(config, jax.random.fold_in(key, 0))
  _, _, objective = build_models(config)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      teacher_params=params,
      opt_state=make_optimizer(config).init(params),
      objective_state=objective.init_state(config),
      rng=jax.random.fold_in(key, 1),
      skipped_steps=jnp.zeros((), jnp.int32))


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


# --------------------------------------------------------------------------- train step


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


# --------------------------------------------------------------------------- features


def make_feature_fn(config, mesh) -> Callable:
  """`fn(backbone_params, images [b, H, W, C]) -> {'cls': [b, width]}`, jitted on `mesh`."""
  backbone = models.build_backbone(config)

  @functools.partial(jax.jit, out_shardings=sharding_lib.replicated(mesh))
  def features(params, images):
    return {"cls": backbone.apply({"params": params}, images)["cls"].astype(jnp.float32)}

  batch_sharding = sharding_lib.batch_sharding(mesh)

  def fn(params, images):
    return features(params, jax.device_put(np.asarray(images), batch_sharding))
  return fn


def knn_evaluate(config, backbone_params, mesh) -> dict[str, float]:
  """Weighted k-NN of the backbone's CLS features: bank split -> test split."""
  from bits_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import knn  # pylint: disable=g-import-not-at-top

  feature_fn = make_feature_fn(config, mesh)
  apply_fn = lambda images: feature_fn(backbone_params, images)
  bank = features_lib.extract_features(
      apply_fn, pipeline.make_eval_iterator(config, config.bank_split))
  test = features_lib.extract_features(
      apply_fn, pipeline.make_eval_iterator(config, config.test_split))
  info = pipeline.get_dataset_info(config)
  return knn.knn_classify(
      bank["cls"], bank["label"], test["cls"], test["label"],
      num_classes=info.num_classes, ks=tuple(config.knn_ks), temperature=config.knn_temperature,
      bank_mask=bank["mask"], query_mask=test["mask"], mesh=mesh)


# ------------------------------------------------------------------------------- loop


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def abstract_state(config, mesh):
  """Shapes, dtypes and shardings of the train state, without allocating it."""
  shapes = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0)))
  repl = sharding_lib.replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), shapes)


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


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the final state."""
  from bits_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bits_jax.data import prefetch  # pylint: disable=g-import-not-at-top

  mesh = sharding_lib.make_mesh(config)
  sharding_lib.check_batch_divisible(config.batch_size, mesh, "batch_size")
  sharding_lib.check_batch_divisible(config.eval_batch_size, mesh, "eval_batch_size")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  manager = checkpoint_manager(workdir, config)
  state = initial_or_restored_state(config, mesh, manager)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_fn = compile_train_step(config, mesh, state_sharding)
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items()
                          if isinstance(v, (int, float, str, bool))})

  batches = prefetch.prefetch_to_mesh(
      pipeline.make_train_iterator(config, start_step=start_step),
      sharding_lib.batch_sharding(mesh), size=2)
  t0, steps_timed = time.time(), 0
  for step in range(start_step, config.total_steps):
    batch = next(batches)
    state, metrics = step_fn(state, batch)
    steps_timed += 1
    done = step + 1
    if done % config.log_every == 0 or done == config.total_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.time() - t0
      rate = steps_timed / max(elapsed, 1e-9)
      scalars = {k: float(v) for k, v in metrics.items()}
      scalars["steps_per_second"] = rate
      writer.write_scalars(done, scalars)
      if jax.process_index() == 0:
        print(f"step {done}/{config.total_steps} | loss {scalars['loss']:.4f} | "
              f"bit acc {scalars.get('agreement_accuracy', float('nan')):.3f} | "
              f"lr {scalars['learning_rate']:.2e} | {rate:.2f} steps/s | "
              f"ETA {_format_eta((config.total_steps - done) / rate)}", flush=True)
      t0, steps_timed = time.time(), 0
    if done % config.checkpoint_every == 0 or done == config.total_steps:
      manager.save(done, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  writer.flush()
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train, then k-NN of the trained teacher backbone vs. the same model at random init."""
  state = train(config, workdir)
  mesh = sharding_lib.make_mesh(config)
  results = {}
  if config.knn_eval:
    trained = knn_evaluate(config, state.teacher_params["backbone"], mesh)
    random_params = init_params(config, jax.random.PRNGKey(config.seed + 1))["backbone"]
    random_init = knn_evaluate(config, random_params, mesh)
    k = config.knn_ks[0]
    results = {"knn_top1": trained[f"knn_top1_k{k}"],
               "knn_top1_random_init": random_init[f"knn_top1_k{k}"],
               "knn_k": k,
               "step": int(state.step),
               "method": config.method,
               "dataset": config.dataset}
    results.update({f"trained/{k2}": v for k2, v in trained.items()})
    results.update({f"random_init/{k2}": v for k2, v in random_init.items()})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
      writer = metric_writers.create_default_writer(workdir)
      writer.write_scalars(int(state.step), {k2: v for k2, v in results.items()
                                             if isinstance(v, float)})
      writer.flush()
      print(f"k-NN top-1 (k={k}) on {config.dataset}:{config.test_split}: "
            f"BITS-trained {100 * results['knn_top1']:.2f}% | random init "
            f"{100 * results['knn_top1_random_init']:.2f}%", flush=True)
  return results
