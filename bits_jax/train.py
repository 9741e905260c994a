"""The training loop and end-of-run evaluation.

`train` restores the latest checkpoint in the workdir (or starts fresh), runs the jitted
train step over the input pipeline, logs metrics with CLU and saves Orbax checkpoints;
`train_and_evaluate` then reports k-NN of the trained teacher backbone next to the same
architecture at random init.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bits_jax import checkpoint as checkpoint_lib
from bits_jax import config_validation
from bits_jax import models
from bits_jax import preemption
from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import train_step as train_step_lib


def make_feature_fn(config, mesh) -> Callable:
  """`fn(backbone_params, images [b, H, W, C], batch_stats=None) -> {'cls': [b, width]}`.

  Jitted on `mesh`, in eval mode: a BatchNorm backbone normalizes with `batch_stats`, its
  running averages (required for one).
  """
  backbone = models.build_backbone(config)

  @functools.partial(jax.jit, out_shardings=sharding_lib.replicated(mesh))
  def features(variables, images):
    return {"cls": backbone.apply(variables, images, train=False)["cls"].astype(jnp.float32)}

  batch_sharding = sharding_lib.batch_sharding(mesh)

  def fn(params, images, batch_stats=None):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if not isinstance(images, jax.Array):  # this process's rows -> one global batch
      images = jax.make_array_from_process_local_data(batch_sharding, np.asarray(images))
    return features(variables, images)
  return fn


def knn_evaluate(config, backbone_params, mesh, batch_stats=None) -> dict[str, float]:
  """Weighted k-NN of the backbone's CLS features: bank split -> test split.

  `batch_stats`: the backbone's BatchNorm running averages (None for a ViT).
  """
  from bits_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bits_jax.data import sources  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import knn  # pylint: disable=g-import-not-at-top

  feature_fn = make_feature_fn(config, mesh)
  apply_fn = lambda images: feature_fn(backbone_params, images, batch_stats)
  bank = features_lib.extract_features(
      apply_fn, pipeline.make_eval_iterator(config, config.bank_split), mesh=mesh)
  test = features_lib.extract_features(
      apply_fn, pipeline.make_eval_iterator(config, config.test_split), mesh=mesh)
  info = sources.get_dataset_info(config)
  return knn.knn_classify(
      bank["cls"], bank["label"], test["cls"], test["label"],
      num_classes=info.num_classes, ks=tuple(config.knn_ks), temperature=config.knn_temperature,
      bank_mask=bank["mask"], query_mask=test["mask"], mesh=mesh)


# ------------------------------------------------------------------------------- loop


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


class NonFiniteError(RuntimeError):
  """The run stopped on non-finite loss/gradients (`config.on_nonfinite`)."""


class NonFiniteGuard:
  """Counts updates the train step skipped for a non-finite loss or gradients.

  `observe(step, skipped)` returns why the run must stop, or None: at the first skipped
  update under `on_nonfinite='stop'`, after `max_consecutive_nonfinite` in a row under 'skip'.
  """

  def __init__(self, config):
    self.policy = config.get("on_nonfinite", "skip")
    self.max_consecutive = int(config.get("max_consecutive_nonfinite", 10))
    self.consecutive = 0
    self.total = 0

  def observe(self, step: int, skipped: bool) -> str | None:
    if not skipped:
      self.consecutive = 0
      return None
    self.consecutive += 1
    self.total += 1
    if jax.process_index() == 0:
      print(f"step {step}: non-finite loss or gradients, update skipped "
            f"({self.consecutive} in a row, {self.total} in this run)", flush=True)
    if self.policy == "stop":
      return (f"Stopping at step {step}: the loss or gradients are not finite "
              f"(config.on_nonfinite='stop').")
    if self.consecutive >= self.max_consecutive:
      return (f"Stopping at step {step}: {self.consecutive} consecutive updates had a "
              f"non-finite loss or gradients and were skipped "
              f"(config.max_consecutive_nonfinite={self.max_consecutive}).")
    return None


def _store_config(config, workdir: str, resuming: bool) -> None:
  """Checks a resumed run's config against WORKDIR/config.json, then (re)writes it."""
  path = os.path.join(workdir, "config.json")
  if resuming and os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    for key, (old, new) in config_validation.check_resume_config(stored, config).items():
      if jax.process_index() == 0:
        print(f"Config change on resume: {key}: {old!r} -> {new!r}", flush=True)
  if jax.process_index() == 0:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at_step: int | None = None, devices=None) -> train_state_lib.TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the final state.

  Before anything is built: the config is validated (`ConfigError`), the workdir must be
  writable and not in use by another run (`preemption.WorkdirError`). A SIGTERM/SIGINT
  ends the run after the current step with a checkpoint there (`preemption.Preempted`);
  non-finite updates are skipped, and `NonFiniteError` stops the run per
  `config.on_nonfinite` / `max_consecutive_nonfinite`, without saving the bad state.
  """
  config_validation.validate_config(config, devices=devices)
  preemption.check_writable(workdir)
  with preemption.WorkdirLock(workdir), preemption.StopRequest() as stop:
    return _train(config, workdir, stop, stop_at_step=stop_at_step, devices=devices)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: preemption.StopRequest, *,
           stop_at_step: int | None = None, devices=None) -> train_state_lib.TrainState:
  """The loop of `train`, inside the workdir lock and the signal handlers.

  `stop_at_step` ends the run early (with a checkpoint) without changing the schedules,
  which depend on `config.total_steps` only. `devices` (default: all) are the devices of
  the `config.mesh` mesh. On several processes every process runs this same function; only
  process 0 writes logs and files, checkpoints are written collectively.
  """
  from bits_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bits_jax.data import prefetch  # pylint: disable=g-import-not-at-top

  mesh = sharding_lib.make_mesh(config, devices)
  sharding_lib.check_batch_divisible(config.batch_size, mesh, "batch_size",
                                     micro_batches=config.get("grad_accum_steps", 1))
  sharding_lib.check_batch_divisible(config.eval_batch_size, mesh, "eval_batch_size")
  checkpoints = checkpoint_lib.Checkpoints(workdir, config)
  _store_config(config, workdir, resuming=bool(checkpoints.steps()))
  state = checkpoints.restore_or_init(config, mesh)
  if config.get("init_from") and int(state.step) == 0:
    state = init_backbone_from(state, config)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_fn = train_step_lib.compile_train_step(config, mesh, state_sharding)
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
  last_step = config.total_steps if stop_at_step is None else min(stop_at_step,
                                                                    config.total_steps)
  run_t0 = None
  guard = NonFiniteGuard(config)
  pending = None  # (step, update_skipped) read one step late, so one step stays in flight

  def settle():
    """Acts on the pending step's skip flag; stops the run (no save) if the guard says so."""
    nonlocal pending
    if pending is None:
      return
    (step_done, skipped), pending = pending, None
    reason = guard.observe(step_done, bool(jax.device_get(skipped)))
    if reason:
      checkpoints.finalize()  # a save in flight holds an earlier, good state
      writer.flush()
      intact = checkpoints.steps()
      raise NonFiniteError(
          f"{reason} The last good checkpoint ({f'step {intact[-1]}' if intact else 'none'}) "
          f"in {checkpoints.directory} is intact. Fix the cause (a lower learning_rate, "
          f"NaN/Inf in the data, float32 instead of bfloat16), then rerun the same command "
          f"to resume from it.")

  stopping = False
  for step in range(start_step, last_step):
    batch = next(batches)
    state, metrics = step_fn(state, batch)
    settle()
    pending = (step + 1, metrics["update_skipped"])
    if run_t0 is None:  # the run's steps/s leaves out the first step (compilation)
      jax.block_until_ready(state.step)
      run_t0 = time.time()
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
    stopping = stop.should_stop(done)
    if done % config.checkpoint_every == 0 or done == last_step or stopping:
      settle()
      checkpoints.save(done, state)
    if stopping:
      break
  settle()
  checkpoints.finalize()  # waits for the async save to commit, writes its manifest
  writer.flush()
  if stopping:
    raise preemption.Preempted(int(state.step), stop.signal_name, checkpoints.directory)
  timed_steps = last_step - start_step - 1
  if timed_steps > 0 and jax.process_index() == 0:
    jax.block_until_ready(state)
    seconds = time.time() - run_t0
    with open(os.path.join(workdir, "train_speed.json"), "w") as f:
      json.dump({"steps": timed_steps, "seconds": seconds,
                 "steps_per_second": timed_steps / seconds,
                 "devices": [str(d) for d in mesh.devices.flat]}, f, indent=2)
  return state


def init_backbone_from(state, config):
  """Student and teacher backbones (and BatchNorm statistics) from `config.init_from`.

  The head stays fresh: the new run learns its own code on the new data.
  """
  from bits_jax.evaluate import pretrained  # pylint: disable=g-import-not-at-top
  loaded, step = pretrained.load_params(config.init_from)
  place = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jax.device_put(n, o.sharding), new, old)
  backbone = place(pretrained.adapt_params(loaded["backbone"], state.params["backbone"]),
                   state.params["backbone"])
  replace = {"params": dict(state.params, backbone=backbone),
             "teacher_params": dict(state.teacher_params, backbone=backbone)}
  if state.batch_stats and "batch_stats" in loaded:
    stats = place(pretrained.adapt_params(loaded["batch_stats"]["backbone"],
                                          state.batch_stats["backbone"]),
                  state.batch_stats["backbone"])
    replace["batch_stats"] = dict(state.batch_stats, backbone=stats)
    replace["teacher_batch_stats"] = dict(state.teacher_batch_stats, backbone=stats)
  print(f"Initialized the backbone from {config.init_from}"
        + (f" (step {step})" if step is not None else ""), flush=True)
  return state.replace(**replace)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train, then k-NN of the trained teacher backbone vs. the same model at random init."""
  state = train(config, workdir)
  mesh = sharding_lib.make_mesh(config)
  results = {}
  if config.knn_eval:
    trained = knn_evaluate(config, state.teacher_params["backbone"], mesh,
                           state.teacher_batch_stats.get("backbone"))
    random_params, random_stats = train_state_lib.init_variables(
        config, jax.random.PRNGKey(config.seed + 1))
    random_init = knn_evaluate(config, random_params["backbone"], mesh,
                               random_stats.get("backbone"))
    k = config.knn_ks[0]
    results = {"knn_top1": trained[f"knn_top1_k{k}"],
               "knn_top1_random_init": random_init[f"knn_top1_k{k}"],
               "knn_k": k,
               "step": int(state.step),
               "method": config.method,
               "dataset": config.dataset}
    results.update({f"trained/{k2}": v for k2, v in trained.items()})
    results.update({f"random_init/{k2}": v for k2, v in random_init.items()})
    if config.get("init_from"):
      # SSL adaptation: the same evaluation before (loaded weights) and after training.
      from bits_jax.evaluate import pretrained  # pylint: disable=g-import-not-at-top
      loaded, _ = pretrained.load_params(config.init_from)
      stats = None
      if state.teacher_batch_stats and "batch_stats" in loaded:
        stats = pretrained.adapt_params(loaded["batch_stats"]["backbone"], jax.device_get(
            state.teacher_batch_stats["backbone"]))
      before = knn_evaluate(config, pretrained.adapt_params(
          loaded["backbone"], jax.device_get(state.params["backbone"])), mesh, stats)
      results["knn_top1_init_from"] = before[f"knn_top1_k{k}"]
      results.update({f"init_from/{k2}": v for k2, v in before.items()})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
      writer = metric_writers.create_default_writer(workdir)
      writer.write_scalars(int(state.step), {k2: v for k2, v in results.items()
                                             if isinstance(v, float)})
      writer.flush()
      print(f"k-NN top-1 (k={k}) on {config.dataset}:{config.test_split}: "
            f"{config.method}-trained {100 * results['knn_top1']:.2f}% | random init "
            f"{100 * results['knn_top1_random_init']:.2f}%"
            + (f" | before (init_from) {100 * results['knn_top1_init_from']:.2f}%"
               if "knn_top1_init_from" in results else ""), flush=True)
  return results
