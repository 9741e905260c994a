"""Side-by-side run of several methods with the same backbone, data, schedule and evaluation.

  python -m bits_jax.compare --config=configs/fashion_mnist.py --methods=bits,dino,simdino \
      --workdir=DIR [--config.total_steps=200 --config.optim.learning_rate=5e-4]

The config file (with its preset, e.g. `--config=configs/fashion_mnist.py:test`) and the
`--config.*` overrides are the same for every method; each method M then sets
`objective.name = M` (`configs/common.set_method`: DINO and SimDINO keep their head). Each
method trains and is evaluated (k-NN) in DIR/M exactly as `bits_jax.main` would (rerunning
resumes); then DIR/compare.md (a Markdown table) and DIR/compare.json hold k-NN top-1, the
random-init baseline and training steps/s (compilation excluded).
"""

import json
import time

from absl import app
from absl import flags
import jax
import ml_collections

from bits_jax import objectives
from bits_jax import run_guard
from bits_jax import train
from bits_jax import utils

_CONFIG = utils.define_config_flag("Config file, FILE.py[:preset].")
_METHODS = flags.DEFINE_list("methods", list(objectives.NAMES), "Methods to compare.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per method).")


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """A copy of `config` training `method`: one of `configs.common.METHODS` (an objective, or a
  variant such as 'bits_fixed', 'bits_cosine'); the method's own settings stay as configured."""
  from configs import common  # pylint: disable=g-import-not-at-top

  return common.set_method(config.copy_and_resolve_references(), method)


def markdown_table(rows: list[dict]) -> str:
  """The comparison table: one row per method."""
  k = rows[0]["knn_k"] if rows else 20
  lines = [
      f"| method | k-NN top-1 (k={k}) | random init | steps | steps/s | train + eval (s) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    rate = f"{r['steps_per_second']:.2f}" if r.get("steps_per_second") else "n/a"
    lines.append(
        f"| {r['method']} | {100 * r['knn_top1']:.2f}% | "
        f"{100 * r['knn_top1_random_init']:.2f}% | {r['step']} | {rate} | "
        f"{r['wall_seconds']:.0f} |"
    )
  return "\n".join(lines) + "\n"


def compare(config: ml_collections.ConfigDict, methods, workdir) -> list[dict]:
  """Trains and evaluates every method in `workdir/<method>` (any epath: local or gs://);
  returns one row per method."""
  configs = [method_config(config, m) for m in methods]
  if not any(e.type == "knn" and e.at_end for e in config.evals.values()):
    raise ValueError("compare reports k-NN top-1: keep config.evals.knn.at_end=True.")
  if not config.baseline_random_init:
    raise ValueError(
        "compare reports the random-init baseline: keep config.baseline_random_init=True."
    )
  head = config.objective.head
  resetting = [m for m in methods if m in ("bits", "bits_cosine")]
  if resetting and not (head.reset_every_steps or head.reset_every_epochs):
    # E.g. a method preset (`:dino`, `:bits_fixed`) turned the resets off: these rows would be
    # BITS-fixed under the BITS-reset label.
    raise ValueError(
        f"--methods={','.join(resetting)} re-initialise the head, but the config sets no "
        "reset period (objective.head.reset_every_steps / _epochs): pass the config without "
        "a method preset (e.g. configs/fashion_mnist.py:test, not :test,dino), or set one."
    )
  workdir = run_guard.workdir_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = []
  for method, method_cfg in zip(methods, configs):
    run_dir = workdir / method
    t0 = time.time()
    results = train.train_and_evaluate(method_cfg, run_dir)
    row = {
        "method": method,
        "wall_seconds": time.time() - t0,
        **{k: results[k] for k in ("knn_top1", "knn_top1_random_init", "knn_k", "step")},
    }
    speed_file = run_dir / "train_speed.json"
    if speed_file.exists():
      row["steps_per_second"] = json.loads(speed_file.read_text())["steps_per_second"]
    rows.append(row)
  if jax.process_index() == 0:
    table = markdown_table(rows)
    devices = f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    (workdir / "compare.md").write_text(f"Methods: {list(methods)}, devices: {devices}\n\n{table}")
    summary = {
        "methods": list(methods),
        "devices": devices,
        "rows": rows,
        "config": json.loads(config.to_json_best_effort()),
    }
    (workdir / "compare.json").write_text(json.dumps(summary, indent=2))
    print(table, flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  utils.quiet_absl_logging()
  try:
    compare(_CONFIG.value, _METHODS.value, _WORKDIR.value)
  except ValueError as e:  # an unknown method, a config compare cannot use
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=utils.parse_flags)
