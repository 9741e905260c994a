"""Evaluation of one set of weights: every `config.evals` entry, results written to a directory.

`evaluate(config, weights=..., out_dir=...)` loads weights (a run's checkpoint or converted
weights, see `bits_jax/weights.py`), builds an `EvalContext` and runs the evaluators
(`common.run_evaluators`); `write_results` writes `results.json`, `results.md` and TensorBoard
scalars and images. The train loop uses the same pieces. `out_dir` is any etils.epath path
(local or `gs://...`); evaluators draw their figures in a local directory
(`local_figure_dir`) that is uploaded when it is not the output directory itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import ml_collections
import numpy as np

from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import weights as weights_lib
from bits_jax.evaluate import common
from bits_jax.evaluate import report


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A run's config.json as a ConfigDict (JSON lists back to the tuples the code expects).

  Options added to the code after the run was written take their defaults, so a workdir
  from an older version still evaluates (with the settings it was trained with).
  """
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top

  def with_tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    for key, value in config.items():
      if isinstance(value, ml_collections.ConfigDict):
        with_tuples(value)
      elif isinstance(value, list):
        with config.ignore_type():
          config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return config

  stored = with_tuples(ml_collections.ConfigDict(json.loads(text)))
  return config_defaults.complete(stored)


def load_variables(config, components, weights: str, which: str = "teacher"):
  """({'backbone', 'head'?, 'batch_stats'?} adapted to the config's model, step)."""
  loaded, step = weights_lib.load_params(weights, which)
  params, batch_stats = jax.eval_shape(
      lambda: train_state_lib.init_variables(components, jax.random.PRNGKey(0))
  )
  target = dict(params)
  if "head" not in loaded:  # e.g. converted backbone-only weights
    del target["head"]
  elif jax.tree_util.tree_structure(loaded["head"]) != jax.tree_util.tree_structure(target["head"]):
    logging.warning(
        "Checkpoint head does not match config.objective.name=%s: codes skipped.",
        config.objective.name,
    )
    del target["head"]
  if batch_stats:
    target["batch_stats"] = batch_stats
  loaded = {k: loaded[k] for k in target if k in loaded}
  return weights_lib.adapt_params(loaded, target), step


@contextlib.contextmanager
def local_figure_dir(out_dir: epath.PathLike) -> Iterator[str]:
  """A local directory for the evaluators' figures: `out_dir` itself when it is local, else
  a temporary one whose files are copied to `out_dir` (e.g. gs://...) on exit (process 0)."""
  out_dir = epath.Path(out_dir)
  if "://" not in os.fspath(out_dir):
    yield os.fspath(out_dir.absolute())
    return
  with tempfile.TemporaryDirectory(prefix="bits_jax_figures_") as local:
    yield local
    if jax.process_index() == 0:
      for root, _, names in os.walk(local):
        for name in names:
          rel = os.path.relpath(os.path.join(root, name), local)
          (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
          (out_dir / rel).write_bytes(epath.Path(root, name).read_bytes())


def evaluate(
    config: ml_collections.ConfigDict,
    *,
    weights: epath.PathLike,
    out_dir: epath.PathLike,
    which: str = "teacher",
    mesh=None,
    names=None,
) -> dict[str, Any]:
  """Runs the `config.evals` entries (all, or `names`) on `weights`; writes under `out_dir`."""
  mesh = mesh or sharding_lib.make_mesh(config)
  sharding_lib.check_batch_divisible(config.input.eval_batch_size, mesh, "input.eval_batch_size")
  components = train_state_lib.build(config)
  variables, step = load_variables(config, components, weights, which)
  results: dict[str, Any] = {
      "weights": os.fspath(weights),
      "step": step,
      "which": which,
      "dataset": config.input.dataset,
      "method": config.objective.name,
  }
  with local_figure_dir(out_dir) as figure_dir:
    ctx = common.EvalContext(
        config,
        components,
        variables,
        mesh,
        step=step,
        out_dir=figure_dir if jax.process_index() == 0 else None,
    )
    try:
      common.run_evaluators(ctx, config.evals, names, into=results)
    except Exception:
      write_incomplete(results, out_dir)
      raise
    write_results(results, out_dir, step=step or 0, plots=ctx.plots, config=config)
  return results


def write_incomplete(results: dict[str, Any], out_dir: epath.PathLike) -> None:
  """After an evaluator raised: the metrics measured before it, in results_incomplete.json.

  `results['failed']` names the evaluator; an earlier complete results.json is left as it is.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(out_dir) / "results_incomplete.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2, default=float))
  logging.error("%s; the metrics measured before it are in %s", results.get("failed"), path)


def write_results(
    results: dict[str, Any],
    out_dir: epath.PathLike,
    *,
    step: int,
    plots=(),
    prefix: str = "eval/",
    config: ml_collections.ConfigDict | None = None,
) -> None:
  """results.json, results.md, TensorBoard scalars (and the PNGs in `plots`), process 0.

  `out_dir`: any epath (local or gs://); `plots`: local PNG paths (see `local_figure_dir`);
  results.md is `report.markdown_report(results, config)` (the paper's tables beside ours).
  """
  if jax.process_index() != 0:
    return
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
  (out_dir / "results_incomplete.json").unlink(missing_ok=True)  # an earlier failed attempt's
  (out_dir / "results.md").write_text(report.markdown_report(results, config))
  writer = metric_writers.create_default_writer(os.fspath(out_dir))
  writer.write_scalars(step, scalars(results, prefix))
  if plots:
    from bits_jax.evaluate import plots as plots_lib  # pylint: disable=g-import-not-at-top

    plots_lib.log_plots(writer, step, list(plots))
  writer.flush()


def scalars(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numeric entries of `results` (without 'step') as floats, keys prefixed."""
  return {
      f"{prefix}{k}": float(v)
      for k, v in results.items()
      if isinstance(v, (float, int, np.floating, np.integer))
      and not isinstance(v, bool)
      and k != "step"
  }


def markdown_table(results: dict[str, Any]) -> str:
  lines = ["| metric | value |", "| --- | --- |"]
  for key, value in results.items():
    if isinstance(value, (float, np.floating)):
      lines.append(f"| {key} | {value:.4f} |")
    else:
      lines.append(f"| {key} | {value} |")
  return "\n".join(lines) + "\n"
