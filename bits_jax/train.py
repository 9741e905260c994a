"""The training loop: build once, step, checkpoint, evaluate.

`train` restores the latest checkpoint in the workdir (or starts fresh), runs the jitted
train step over the input pipeline, logs metrics with CLU, saves Orbax checkpoints and runs
the `config.evals` entries that have `every` > 0; `train_and_evaluate` then runs the `at_end`
evaluators on the trained teacher (and, with `baseline_random_init`, on the same model at
random init) and writes `WORKDIR/results.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from clu import metric_writers
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bits_jax import checkpoint as checkpoint_lib
from bits_jax import config_validation
from bits_jax import run_guard
from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import train_step as train_step_lib
from bits_jax import utils
from bits_jax.train_state import Components, TrainState


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


def steps_per_epoch(config) -> int:
  """Updates per pass over the training split."""
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  info = data.get_dataset_info(config)
  examples = info.num_examples.get(config.input.train_split)
  if not examples:
    return 0
  return max(int(examples) // int(config.input.batch_size), 1)


def teacher_variables(state: TrainState) -> dict:
  """The EMA teacher as evaluation variables {'backbone', 'head', 'batch_stats'?}."""
  variables = dict(state.teacher_params)
  if state.teacher_batch_stats:
    variables["batch_stats"] = state.teacher_batch_stats
  return variables


class _Trace:
  """A jax profiler trace of steps (profile_first_step, + profile_steps] on process 0."""

  def __init__(self, config, workdir):
    self.steps = config.get("profile_steps", 0) if jax.process_index() == 0 else 0
    self.first = config.get("profile_first_step", 10)
    self.logdir = os.fspath(workdir)
    self.running = False

  def after_step(self, done: int, state) -> None:
    if not self.steps:
      return
    if done == self.first and not self.running:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.logdir)
      self.running = True
    elif self.running and done >= self.first + self.steps:
      self.stop(state)

  def stop(self, state) -> None:
    if self.running:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.running = False
      print(f"Profile written to {self.logdir}/plugins/profile (TensorBoard: Profile tab)")


def _check_config_change(config, workdir: epath.PathLike, resuming: bool) -> None:
  """Checks a resumed run's config against WORKDIR/config.json (ConfigError if refused)."""
  path = run_guard.workdir_path(workdir) / "config.json"
  if resuming and path.exists():
    stored = json.loads(path.read_text())
    for key, (old, new) in config_validation.check_resume_config(stored, config).items():
      if jax.process_index() == 0:
        print(f"Config change on resume: {key}: {old!r} -> {new!r}", flush=True)


def _store_config(config, workdir: epath.PathLike) -> None:
  """(Re)writes WORKDIR/config.json: once the state is restored or built, so that a refused
  resume leaves the config the checkpoints were written with."""
  if jax.process_index() == 0:
    path = run_guard.workdir_path(workdir) / "config.json"
    checkpoint_lib.write_text_atomically(path, config.to_json_best_effort(indent=2))


def train(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    stop_at_step: int | None = None,
    devices=None,
) -> TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the final state.

  `workdir`: any etils.epath path (local, relative, `gs://...`). Before anything is built:
  the config is validated (`ConfigError`), the workdir must be
  writable and not in use by another run (`run_guard.WorkdirError`). A SIGTERM/SIGINT
  ends the run after the current step with a checkpoint there (`run_guard.Preempted`);
  non-finite updates are skipped, and `NonFiniteError` stops the run per
  `config.on_nonfinite` / `max_consecutive_nonfinite`, without saving the bad state.
  """
  with (
      _locked_workdir(config, workdir, devices) as workdir,
      run_guard.StopRequest() as stop,
      checkpoint_lib.Checkpoints(workdir, config) as checkpoints,
  ):
    return _train(config, checkpoints, stop, stop_at_step=stop_at_step, devices=devices)


@contextlib.contextmanager
def _locked_workdir(config, workdir: epath.PathLike, devices=None):
  """The validated config's workdir, checked writable and locked (see `train`)."""
  config_validation.validate_config(config, devices=devices)
  workdir = run_guard.workdir_path(workdir)
  run_guard.check_writable(workdir)
  with run_guard.WorkdirLock(workdir):
    yield workdir


def _train(
    config: ml_collections.ConfigDict,
    checkpoints: checkpoint_lib.Checkpoints,
    stop: run_guard.StopRequest,
    *,
    stop_at_step: int | None = None,
    devices=None,
) -> TrainState:
  """The loop of `train`, inside the workdir lock and the signal handlers.

  `stop_at_step` ends the run early (with a checkpoint) without changing the schedules,
  which depend on `config.total_steps` only. `devices` (default: all) are the devices of
  the `config.mesh` mesh. On several processes every process runs this same function; only
  process 0 writes logs and files, checkpoints are written collectively.
  """
  from bits_jax import data  # pylint: disable=g-import-not-at-top
  from bits_jax.data import prefetch  # pylint: disable=g-import-not-at-top

  mesh = sharding_lib.make_mesh(config, devices)
  components = train_state_lib.build(config, steps_per_epoch(config))
  workdir = checkpoints.workdir
  _check_config_change(config, workdir, resuming=bool(checkpoints.steps()))
  state = checkpoints.restore_or_init(components, config, mesh)
  if config.init_from and int(state.step) == 0:
    try:
      state = init_backbone_from(state, config)
    except (FileNotFoundError, ValueError) as error:  # missing or unfitting weights
      raise config_validation.ConfigError(f"config.init_from: {error}") from error
  _store_config(config, workdir)
  step_fn = train_step_lib.compile_train_step(
      components, config, mesh, sharding_lib.shardings_of(state)
  )
  start_step = int(state.step)
  if start_step > config.total_steps and jax.process_index() == 0:
    print(
        f"Checkpoint step {start_step} in {checkpoints.directory} is past "
        f"config.total_steps={config.total_steps}: nothing to train, the run ends with the "
        f"step-{start_step} state. For a shorter run, use a new --workdir.",
        flush=True,
    )
  periodic = {name: entry for name, entry in config.evals.items() if entry.every > 0}

  writer = metric_writers.create_default_writer(
      os.fspath(workdir), just_logging=jax.process_index() > 0
  )
  if start_step == 0:
    writer.write_hparams({
        k: v
        for k, v in config_validation.flat_items(config)
        if isinstance(v, (int, float, str, bool))
    })

  batches = prefetch.prefetch_to_mesh(
      data.make_train_iterator(config, start_step=start_step),
      sharding_lib.batch_sharding(mesh),
      size=2,
  )
  t0, steps_timed = time.time(), 0
  last_step = config.total_steps if stop_at_step is None else min(stop_at_step, config.total_steps)
  run_t0 = None
  guard = run_guard.NonFiniteGuard(config)
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
      raise run_guard.NonFiniteError(
          f"{reason} The last good checkpoint ({f'step {intact[-1]}' if intact else 'none'}) "
          f"in {checkpoints.directory} is intact. Fix the cause (a lower optim.learning_rate, "
          "NaN/Inf in the data, float32 instead of bfloat16), then rerun the same command "
          "to resume from it."
      )

  trace = _Trace(config, workdir)
  stopping = False
  for step in range(start_step, last_step):
    batch = next(batches)
    if step == 0:
      _log_views(writer, batch)
    state, metrics = step_fn(state, batch)
    settle()
    pending = (step + 1, metrics["update_skipped"])
    done = step + 1
    trace.after_step(done, state)
    if run_t0 is None:  # rates and the ETA leave out the first step (compilation)
      jax.block_until_ready(state.step)
      run_t0 = t0 = time.time()
    else:
      steps_timed += 1
    if done % config.log_every == 0 or done == config.total_steps:
      metrics = jax.device_get(metrics)
      scalars = {k: float(v) for k, v in metrics.items() if v.ndim == 0}
      # No rate without a timed step (the first step of a run compiles): a NaN would
      # break the TensorBoard chart, so the scalar is left out.
      if steps_timed:
        rate = steps_timed / max(time.time() - t0, 1e-9)
        scalars["steps_per_second"] = rate
      writer.write_scalars(done, scalars)
      histograms = {k: v for k, v in metrics.items() if v.ndim == 1}
      if histograms:
        writer.write_histograms(done, histograms)
      if jax.process_index() == 0:
        print(
            f"step {done}/{config.total_steps} | loss {scalars['loss']:.4f} | "
            f"bit acc {scalars.get('agreement_accuracy', float('nan')):.3f} | "
            f"lr {scalars['learning_rate']:.2e} | "
            + (
                f"{rate:.2f} steps/s | ETA {_format_eta((config.total_steps - done) / rate)}"
                if steps_timed
                else "? steps/s | ETA ?"
            ),
            flush=True,
        )
      t0, steps_timed = time.time(), 0
    due = [name for name, entry in periodic.items() if done % entry.every == 0]
    if due:
      eval_t0 = time.time()
      _log_evals(components, config, mesh, state, done, due, writer)
      t0 += time.time() - eval_t0  # rates and the ETA count training steps only
    stopping = stop.should_stop(done)
    if done % config.checkpoint_every == 0 or done == last_step or stopping:
      settle()
      checkpoints.save(done, state)
    if stopping:
      break
  settle()
  trace.stop(state)  # a run that ends inside the traced steps
  checkpoints.finalize()  # waits for the async save to commit, writes its manifest
  writer.flush()
  if stopping:
    raise run_guard.Preempted(int(state.step), stop.signal_name, checkpoints.directory)
  timed_steps = last_step - start_step - 1
  if timed_steps > 0 and jax.process_index() == 0:
    jax.block_until_ready(state)
    seconds = time.time() - run_t0
    speed = {
        "steps": timed_steps,
        "seconds": seconds,
        "steps_per_second": timed_steps / seconds,
        "devices": [str(d) for d in mesh.devices.flat],
    }
    (workdir / "train_speed.json").write_text(json.dumps(speed, indent=2))
  return state


def _log_views(writer, batch: dict, num_examples: int = 8) -> None:
  """The first examples' augmented views as image grids (rows: examples, columns: views)."""
  for name in ("global", "local"):
    if name not in batch:
      continue
    views = utils.to_host(batch[name][:num_examples])  # [n, V, S, S, C]
    lo = views.min(axis=(2, 3, 4), keepdims=True)
    hi = views.max(axis=(2, 3, 4), keepdims=True)
    views = (views - lo) / np.maximum(hi - lo, 1e-6)  # per-view contrast stretch
    n, v, h, w, c = views.shape
    grid = views.transpose(0, 2, 1, 3, 4).reshape(1, n * h, v * w, c)
    writer.write_images(0, {f"views/{name}": grid})


def _log_evals(
    components: Components, config, mesh, state: TrainState, step: int, names, writer
) -> dict:
  """Runs the evaluators `names` on the current teacher; logs their scalars at `step`."""
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import run as run_lib  # pylint: disable=g-import-not-at-top

  ctx = common.EvalContext(config, components, teacher_variables(state), mesh, step=step)
  results = common.run_evaluators(ctx, config.evals, names)
  writer.write_scalars(step, run_lib.scalars(results, "eval/"))
  return results


def init_backbone_from(state: TrainState, config) -> TrainState:
  """Student and teacher from `config.init_from`: backbone (and BatchNorm statistics), head.

  The backbone is adapted to the model (channels, position grid). The head follows
  `config.init_from_head`: 'reset' (default) keeps the state's fresh head, drawn from the
  init distribution (BITS-reset's one re-initialisation at the start of continued SSL);
  'keep' loads it too (BITS-fixed), unchanged, and needs the same head shapes. Both branches
  start equal, from the checkpoint's teacher (the EMA model), as in pre-training.
  """
  from bits_jax import weights as weights_lib  # pylint: disable=g-import-not-at-top

  head_mode = config.get("init_from_head", "reset")
  if head_mode not in ("keep", "reset"):
    raise ValueError(f"config.init_from_head={head_mode!r}: use 'keep' or 'reset'.")
  loaded, step = weights_lib.load_params(config.init_from)
  place = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jax.device_put(n, o.sharding), new, old
  )
  backbone = place(
      weights_lib.adapt_params(loaded["backbone"], state.params["backbone"]),
      state.params["backbone"],
  )
  head = state.params["head"]
  if head_mode == "keep":
    head = place(weights_lib.head_params(loaded, head, repr(config.init_from)), head)
  # The teacher gets its own buffers: the step donates the state, and one buffer in two
  # leaves would be donated twice.
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  replace = {
      "params": dict(state.params, backbone=backbone, head=head),
      "teacher_params": dict(state.teacher_params, backbone=copy(backbone), head=copy(head)),
  }
  if state.batch_stats and "batch_stats" in loaded:
    stats = place(
        weights_lib.adapt_params(loaded["batch_stats"]["backbone"], state.batch_stats["backbone"]),
        state.batch_stats["backbone"],
    )
    replace["batch_stats"] = dict(state.batch_stats, backbone=stats)
    replace["teacher_batch_stats"] = dict(state.teacher_batch_stats, backbone=copy(stats))
  print(
      f"Initialized the backbone{' and head' if head_mode == 'keep' else ''} from "
      f"{config.init_from}"
      + (f" (step {step})" if step is not None else ""),
      flush=True,
  )
  return state.replace(**replace)


def _knn_headline(results: dict, config) -> tuple[str, int] | None:
  """('knn/knn_top1_k<k>', k) for the k-NN evaluator's k=20 (else its first k)."""
  for name, entry in config.evals.items():
    if entry.type == "knn" and entry.at_end:
      ks = tuple(entry.ks)
      k = 20 if 20 in ks else ks[0]
      return f"{name}/knn_top1_k{k}", k
  return None


def _pixel_rows(pixels, key: str | None, retrievals: list[str]) -> dict:
  """The rows SSL must beat, from one read of each split (`pixels`: a PixelContext):
  k-NN on raw ([0, 1]) and normalised pixels (`key`: the k-NN headline, or None), and the
  retrieval entries `retrievals` on raw pixels ('pixels/<name>/<metric>')."""
  from bits_jax.evaluate import pixel_baseline  # pylint: disable=g-import-not-at-top

  rows = {}
  if key:
    metric = key.split("/", 1)[1]
    variants = pixel_baseline.pixel_knn_rows(pixels.config, pixels.mesh, context=pixels)
    for label, normalized in (("pixels", False), ("pixels_normalized", True)):
      knn_results = variants[normalized]
      rows.update({f"{label}/knn/{k}": v for k, v in knn_results.items()})
      rows[f"knn_top1_{label}"] = knn_results[metric]
  if retrievals:
    retrieval = pixel_baseline.pixel_retrieval(pixels, tuple(retrievals))
    rows.update({f"pixels/{k}": v for k, v in retrieval.items()})
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Train; then the `at_end` evaluators on the trained teacher (and the random-init model).

  `WORKDIR/results.json` holds every metric under `trained/`, `random_init/` and (with
  `init_from`) `init_from/`, plus the headline `knn_top1`, `knn_top1_random_init`.
  """
  # The lock covers the evaluation too: a second run started meanwhile would otherwise
  # resume from the last checkpoint and write its results over these. Signals stop the
  # training only: a preempted evaluation just ends.
  with _locked_workdir(config, workdir) as workdir:
    with (
        run_guard.StopRequest() as stop,
        checkpoint_lib.Checkpoints(workdir, config) as checkpoints,
    ):
      state = _train(config, checkpoints, stop)
    return _evaluate_at_end(config, workdir, state)


def _evaluate_at_end(config, workdir: epath.Path, state: TrainState) -> dict:
  """The `at_end` evaluators of `train_and_evaluate`, their results written and printed."""
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import pixel_baseline  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import run as run_lib  # pylint: disable=g-import-not-at-top

  names = [name for name, entry in config.evals.items() if entry.at_end]
  if not names:
    return {}
  mesh = sharding_lib.make_mesh(config)
  components = train_state_lib.build(config, steps_per_epoch(config))
  evaluated = {"trained": teacher_variables(state)}
  if config.baseline_random_init:
    evaluated["random_init"] = train_state_lib.random_init_variables(config, components)
  if config.init_from:
    # SSL adaptation: the same evaluation before (loaded weights) and after training.
    evaluated["init_from"], _ = run_lib.load_variables(config, components, config.init_from)
  results = {
      "step": int(state.step),
      "method": config.objective.name,
      "dataset": config.input.dataset,
  }
  plots = []
  with run_lib.local_figure_dir(workdir / "eval") as figure_dir:
    for label, variables in evaluated.items():
      ctx = common.EvalContext(
          config,
          components,
          variables,
          mesh,
          step=int(state.step),
          out_dir=figure_dir if label == "trained" and jax.process_index() == 0 else None,
      )
      try:
        common.run_evaluators(ctx, config.evals, names, into=results, prefix=f"{label}/")
      except Exception as e:
        failure = results.get("failed", f"{type(e).__name__}: {e}")
        results["failed"] = f"{failure} (on the {label} model)"
        run_lib.write_incomplete(results, workdir)
        raise
      plots += ctx.plots
    headline = _knn_headline(results, config)
    if headline:
      key, k = headline
      results["knn_k"] = k
      for label in evaluated:
        suffix = "" if label == "trained" else f"_{label}"
        results[f"knn_top1{suffix}"] = results[f"{label}/{key}"]
    retrievals = [n for n in names if config.evals[n].type == "retrieval"]
    if config.get("baseline_pixels", True) and (headline or retrievals):
      pixels = pixel_baseline.PixelContext(config, mesh, normalized=False)
      results.update(_pixel_rows(pixels, headline[0] if headline else None, retrievals))
    # Figures are read from the local staging dir (TensorBoard), then uploaded on exit.
    run_lib.write_results(
        results, workdir, step=int(state.step), plots=plots, prefix="", config=config
    )
  if headline and jax.process_index() == 0:
    split = next(e.query_split for e in config.evals.values() if e.type == "knn")
    print(
        f"k-NN top-1 (k={k}) on {config.input.dataset}:{split}: "
        f"{config.objective.name}-trained {100 * results['knn_top1']:.2f}%"
        + (
            f" | random init {100 * results['knn_top1_random_init']:.2f}%"
            if "knn_top1_random_init" in results
            else ""
        )
        + (
            f" | before (init_from) {100 * results['knn_top1_init_from']:.2f}%"
            if "knn_top1_init_from" in results
            else ""
        )
        + (
            f" | raw pixels {100 * results['knn_top1_pixels']:.2f}%"
            if "knn_top1_pixels" in results
            else ""
        ),
        flush=True,
    )
  if jax.process_index() == 0:
    _print_retrieval_headline(config, results, retrievals)
  return results


def _print_retrieval_headline(config, results: dict, names: list[str]) -> None:
  """mAP@ALL (the paper's headline) of each at-end retrieval entry, beside its baselines."""
  for name in names:
    if f"trained/{name}/map_all" not in results:
      continue
    cells = {
        "trained": f"trained/{name}/map_all",
        "random init": f"random_init/{name}/map_all",
        "raw pixels": f"pixels/{name}/map_all",
    }
    bits = results.get(f"trained/{name}/codes/num_bits")
    if bits:
      cells[f"trained {int(bits)}-bit codes"] = f"trained/{name}/codes/{int(bits)}/map_all"
    shown = [f"{label} {100 * results[key]:.2f}%" for label, key in cells.items() if key in results]
    entry = config.evals[name]
    print(
        f"mAP@ALL ({name}) on {config.input.dataset}:{entry.query_split} against "
        f"{entry.database_split}: "
        + " | ".join(shown),
        flush=True,
    )
