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
import orbax.checkpoint as ocp

from bits_jax import checkpoint as checkpoint_lib
from bits_jax import models
from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import train_step as train_step_lib


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
  from bits_jax.data import sources  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import knn  # pylint: disable=g-import-not-at-top

  feature_fn = make_feature_fn(config, mesh)
  apply_fn = lambda images: feature_fn(backbone_params, images)
  bank = features_lib.extract_features(
      apply_fn, pipeline.make_eval_iterator(config, config.bank_split))
  test = features_lib.extract_features(
      apply_fn, pipeline.make_eval_iterator(config, config.test_split))
  info = sources.get_dataset_info(config)
  return knn.knn_classify(
      bank["cls"], bank["label"], test["cls"], test["label"],
      num_classes=info.num_classes, ks=tuple(config.knn_ks), temperature=config.knn_temperature,
      bank_mask=bank["mask"], query_mask=test["mask"], mesh=mesh)


# ------------------------------------------------------------------------------- loop


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at_step: int | None = None, devices=None) -> train_state_lib.TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the final state.

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
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  manager = checkpoint_lib.checkpoint_manager(workdir, config)
  state = checkpoint_lib.initial_or_restored_state(config, mesh, manager)
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
  for step in range(start_step, last_step):
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
    if done % config.checkpoint_every == 0 or done == last_step:
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
    random_params = train_state_lib.init_params(config, jax.random.PRNGKey(config.seed + 1))["backbone"]
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
