"""Side-by-side run of several methods with the same backbone, data, schedule and evaluation.

  python -m bits_jax.compare --config=configs/fashion_mnist.py --methods=bits,dino,simdino \
      --workdir=DIR [--set=total_steps=200 --set=learning_rate=5e-4]

For each method M the config file is loaded with the preset 'SIZE,M' (SIZE from
`--config=FILE:SIZE`, e.g. `:test`), so a config file lists the method-specific settings
once, next to the shared ones. Each method trains and is evaluated (k-NN) in DIR/M exactly
as `bits_jax.main` would (rerunning resumes); then DIR/compare.md (a Markdown table) and
DIR/compare.json hold k-NN top-1, the random-init baseline and training steps/s (compilation
excluded).
"""
import ast
import importlib.util
import json
import os
import time

from absl import app
from absl import flags
import jax

from bits_jax import objectives
from bits_jax import train

_CONFIG = flags.DEFINE_string("config", None, "Config file, FILE.py[:SIZE].")
_METHODS = flags.DEFINE_list("methods", ["bits", "dino", "simdino"], "Methods to compare.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per "
                               "method).")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every method.")


def load_config(spec: str, method: str, overrides=()):
  """`get_config('SIZE,method')` of the config file `spec` = 'FILE.py[:SIZE]', overridden."""
  path, _, size = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} not found: pass --config=configs/NAME.py.")
  objectives.get_objective(method)  # fails early on an unknown method
  module_spec = importlib.util.spec_from_file_location("compare_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(",".join(filter(None, (size, method))))
  if config.method != method:
    raise ValueError(f"{path} with preset {size + ',' + method!r} gives method "
                     f"{config.method!r}: its get_config must accept the method as a preset.")
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or key not in config:
      raise ValueError(f"--set={item!r}: use KEY=VALUE with a key of the config.")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    setattr(config, key, value)
  return config


def markdown_table(rows: list[dict]) -> str:
  """The comparison table: one row per method."""
  k = rows[0]["knn_k"] if rows else 20
  lines = [f"| method | k-NN top-1 (k={k}) | random init | steps | steps/s | train + eval (s) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    rate = f"{r['steps_per_second']:.2f}" if r.get("steps_per_second") else "n/a"
    lines.append(f"| {r['method']} | {100 * r['knn_top1']:.2f}% | "
                 f"{100 * r['knn_top1_random_init']:.2f}% | {r['step']} | {rate} | "
                 f"{r['wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def compare(spec: str, methods, workdir: str, overrides=()) -> list[dict]:
  """Trains and evaluates every method in `workdir/<method>`; returns one row per method."""
  configs = [load_config(spec, m, overrides) for m in methods]
  rows = []
  for method, config in zip(methods, configs):
    if not config.knn_eval:
      raise ValueError("compare reports k-NN top-1: do not set knn_eval=False.")
    run_dir = os.path.join(workdir, method)
    t0 = time.time()
    results = train.train_and_evaluate(config, run_dir)
    row = {"method": method, "wall_seconds": time.time() - t0,
           **{k: results[k] for k in ("knn_top1", "knn_top1_random_init", "knn_k", "step")}}
    speed_file = os.path.join(run_dir, "train_speed.json")
    if os.path.exists(speed_file):
      with open(speed_file) as f:
        row["steps_per_second"] = json.load(f)["steps_per_second"]
    rows.append(row)
  if jax.process_index() == 0:
    table = markdown_table(rows)
    devices = f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    with open(os.path.join(workdir, "compare.md"), "w") as f:
      f.write(f"Config: `{spec}`, overrides: {list(overrides)}, devices: {devices}\n\n")
      f.write(table)
    with open(os.path.join(workdir, "compare.json"), "w") as f:
      json.dump({"config": spec, "overrides": list(overrides), "devices": devices,
                 "rows": rows}, f, indent=2)
    print(table, flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  compare(_CONFIG.value, _METHODS.value, _WORKDIR.value, _SET.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
