"""Small-scale reproduction of the paper's comparison (Tab. 1, 2) on Fashion-MNIST, offline.

  python benchmarks/reproduce.py                       # 5 methods x 3 seeds + raw pixels
  python benchmarks/reproduce.py --steps=150 --seeds=0,1 --methods=bits,simdino
  python benchmarks/reproduce.py --set=optim.learning_rate=2e-3   # any config key, all runs

Every run trains `configs/fashion_mnist.py:method=M` (the demo's backbone, data and recipe)
for the same number of steps (`--steps`: equal budget per method), then evaluates the EMA
teacher's backbone with the project's evaluators: weighted k-NN (k=20, T=0.07), linear probe,
retrieval mAP@ALL with the continuous features (cosine) and with the head's codes (Hamming,
logits > 0; BITS messages, and SimDINO's embedding signs as a like-for-like binarisation), and
d_eff / r_eff of the backbone-feature covariance. Raw pixels (the eval pipeline's normalised
inputs) go through the same evaluators. Query and database splits are bounded by flags
(`--query_split`, `--database_split`) because mAP@ALL over 10k x 60k per run does not fit the
CPU budget; the table says which were used.

Resumable: each finished run is a row in `--results` (JSON) and is skipped on a rerun; an
interrupted run resumes from its checkpoint in `--workdir/<method>_s<seed>`. Outputs: the
markdown table (printed and written to `--readme`), the cached rows, and one PNG per BITS run
(`--plot_dir/bit_accuracy_<method>_s<seed>.png`) of the student's bit accuracy over steps,
read from the run's TensorBoard events. Methods (configs/common.py): bits (BITS-reset),
bits_fixed, bits_cosine (cosine agreement on the logits, Tab. 3), dino, simdino.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

LABELS = {
    "dino": "DINO",
    "simdino": "SimDINO",
    "bits_fixed": "BITS-fixed",
    "bits": "BITS-reset",
    "bits_cosine": "BITS-cosine",
}
# (column, results key, scale): metrics of one run, '<evaluator>/<metric>'.
COLUMNS = (
    ("k-NN top-1", "knn/knn_top1_k20", 100),
    ("linear", "linear/linear_top1", 100),
    ("mAP@ALL (features)", "retrieval/map_all", 100),
    ("mAP@ALL (codes)", "retrieval/codes/code/map_all", 100),
    ("d_eff", "geometry/d_eff", 1),
    ("r_eff", "geometry/r_eff", 1),
)

# Our own flag set, added to absl's only when run as a script: tests import this module next
# to bits_jax.compare, whose --config/--methods/--workdir flags share these names.
_FLAGS = flags.FlagValues()
_CONFIG = flags.DEFINE_string(
    "config", "configs/fashion_mnist.py", "Config file (its demo).", flag_values=_FLAGS
)
_PRESET = flags.DEFINE_string(
    "preset", "", "Preset before method=M, e.g. 'test' (a smoke run).", flag_values=_FLAGS
)
_METHODS = flags.DEFINE_list(
    "methods", list(LABELS), "Methods (configs/common.METHODS).", flag_values=_FLAGS
)
_SEEDS = flags.DEFINE_list(
    "seeds", ["0", "1", "2"], "Seeds; each seeds init, data, augment.", flag_values=_FLAGS
)
_STEPS = flags.DEFINE_integer(
    "steps", 0, "Training steps per run; 0: the config's.", flag_values=_FLAGS
)
_SET = flags.DEFINE_multi_string(
    "set", [], "key=value config overrides for every run.", flag_values=_FLAGS
)
# One train-side and one test-side split for every evaluator, so each run extracts features
# of two splits only (mAP@ALL over 10k x 60k per run does not fit the CPU budget).
_TRAIN_SPLIT = flags.DEFINE_string(
    "train_split",
    "train[:10000]",
    "k-NN bank, probe training set, retrieval database.",
    flag_values=_FLAGS,
)
_TEST_SPLIT = flags.DEFINE_string(
    "test_split",
    "test[:5000]",
    "k-NN and retrieval queries, probe test set, d_eff / r_eff.",
    flag_values=_FLAGS,
)
_PROBE_EPOCHS = flags.DEFINE_integer("probe_epochs", 30, "Linear-probe epochs.", flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/bits_reproduce", "Run directories.", flag_values=_FLAGS
)
_RESULTS = flags.DEFINE_string(
    "results",
    os.path.join(REPO, "benchmarks", "reproduce_results.json"),
    "Cached rows.",
    flag_values=_FLAGS,
)
_README = flags.DEFINE_string(
    "readme",
    os.path.join(REPO, "benchmarks", "README_reproduce.md"),
    "Markdown output.",
    flag_values=_FLAGS,
)
_PLOT_DIR = flags.DEFINE_string(
    "plot_dir",
    os.path.join(REPO, "benchmarks", "reproduce_plots"),
    "Bit-accuracy PNGs.",
    flag_values=_FLAGS,
)


def _parse_value(text: str):
  import ast  # pylint: disable=g-import-not-at-top

  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config, overrides) -> None:
  """`key.sub=value` strings onto `config` (values parsed as Python literals)."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: use key=value, e.g. optim.learning_rate=1e-3.")
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    if last not in node:
      raise ValueError(f"--set {item!r}: config has no key {key!r}.")
    value = _parse_value(value)
    node[last] = tuple(value) if isinstance(value, list) else value


def _code_length(config) -> int:
  """Bits of the head's code: BITS messages, or SimDINO's embedding (its signs)."""
  if config.objective.name == "bits":
    return int(config.objective.bits.num_bits)
  return int(config.objective.head.bottleneck_dim or 256)


def eval_entries(config) -> None:
  """The study's evaluators at the end of training (bounded splits from the flags)."""
  evals = config.evals
  for name, entry in evals.items():
    entry.at_end = name in ("knn", "linear", "retrieval", "geometry")
    entry.every = 0
  train_split, test_split = _TRAIN_SPLIT.value, _TEST_SPLIT.value
  evals.knn.update(dict(bank_split=train_split, query_split=test_split, ks=(20,), temperature=0.07))
  evals.linear.update(
      dict(train_split=train_split, test_split=test_split, epochs=_PROBE_EPOCHS.value)
  )
  evals.retrieval.update(
      dict(
          query_split=test_split,
          database_split=train_split,
          ks=(100,),
          code_lengths=(_code_length(config),),
          codes=config.objective.name != "dino",  # DINO's prototype scores are no code
          random_subsets=False,
          asymmetric=False,
      )
  )
  evals.geometry.split = test_split


def run_config(method: str, seed: int):
  from bits_jax import utils  # pylint: disable=g-import-not-at-top

  preset = f"{_PRESET.value}," if _PRESET.value else ""
  config = utils.load_config_file(f"{os.path.join(REPO, _CONFIG.value)}:{preset}method={method}")
  config.seed = seed
  if _STEPS.value and _STEPS.value != config.total_steps:
    # The same number of resets per run as the config's schedule.
    head = config.objective.head
    if head.reset_every_steps:
      head.reset_every_steps = max(head.reset_every_steps * _STEPS.value // config.total_steps, 1)
    config.total_steps = _STEPS.value
  config.checkpoint_every = max(config.total_steps // 2, 1)
  config.baseline_random_init = False
  apply_overrides(config, _SET.value)
  eval_entries(config)
  return config


def scalar_history(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of a scalar in the run's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  history = {}
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        if value.tag == tag:
          data = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
          history[int(event.step)] = float(np.asarray(data).reshape(()))
  return dict(sorted(history.items()))


def plot_history(history: dict[int, float], title: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(list(history), list(history.values()), marker="o", ms=3)
  ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
  ax.set_xlabel("step")
  ax.set_ylabel("student bit accuracy")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _code_key(results: dict) -> dict:
  """Renames 'retrieval/codes/<bits>/...' to 'retrieval/codes/code/...' (one code per run)."""
  out = {}
  for key, value in results.items():
    parts = key.split("/")
    if len(parts) > 3 and parts[1] == "codes" and parts[2].isdigit():
      key = "/".join(parts[:2] + ["code"] + parts[3:])
    out[key] = value
  return out


def train_run(method: str, seed: int) -> dict:
  """Trains and evaluates one run; returns its cached row."""
  from bits_jax import train  # pylint: disable=g-import-not-at-top

  config = run_config(method, seed)
  workdir = os.path.join(_WORKDIR.value, f"{method}_s{seed}")
  t0 = time.time()
  results = train.train_and_evaluate(config, workdir)
  row = {
      "method": method,
      "seed": seed,
      "steps": int(results["step"]),
      "wall_seconds": time.time() - t0,
      "load_average": os.getloadavg()[1],
      "metrics": _code_key(
          {k[len("trained/") :]: v for k, v in results.items() if k.startswith("trained/")}
      ),
  }
  speed = os.path.join(workdir, "train_speed.json")
  if os.path.exists(speed):
    with open(speed) as f:
      row["steps_per_second"] = json.load(f)["steps_per_second"]
  if config.objective.name == "bits":
    row["reset_every_steps"] = int(config.objective.head.reset_every_steps or 0)
    history = scalar_history(workdir, "agreement_accuracy")
    row["bit_accuracy"] = {str(k): v for k, v in history.items()}
    if history:
      path = os.path.join(_PLOT_DIR.value, f"bit_accuracy_{method}_s{seed}.png")
      plot_history(history, f"{LABELS.get(method, method)}, seed {seed}", path)
      row["plot"] = os.path.relpath(path, REPO)
  return row


def pixel_row() -> dict:
  """The same evaluators on the normalised input pixels (no model, one row)."""
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import pixel_baseline  # pylint: disable=g-import-not-at-top

  config = run_config("bits", 0)
  t0 = time.time()
  ctx = pixel_baseline.PixelContext(config)
  metrics = common.run_evaluators(ctx, config.evals, list(_ENTRIES))
  return {"method": "pixels", "seed": 0, "wall_seconds": time.time() - t0, "metrics": metrics}


_ENTRIES = ("knn", "linear", "retrieval", "geometry")


def random_init_row() -> dict:
  """The same evaluators on the backbone at random init (BITS head; seed 0's init)."""
  from bits_jax import sharding  # pylint: disable=g-import-not-at-top
  from bits_jax import train  # pylint: disable=g-import-not-at-top
  from bits_jax import train_state  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top

  config = run_config("bits", 0)
  components = train_state.build(config, train.steps_per_epoch(config))
  variables = train_state.random_init_variables(config, components)
  t0 = time.time()
  ctx = common.EvalContext(config, components, variables, sharding.make_mesh(config))
  metrics = _code_key(common.run_evaluators(ctx, config.evals, list(_ENTRIES)))
  return {"method": "random_init", "seed": 0, "wall_seconds": time.time() - t0, "metrics": metrics}


def _mean_std(values) -> str:
  if not values:
    return "-"
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def segment_accuracy(history: dict, reset_every: int) -> list[tuple[float, float]]:
  """(first, last) logged bit accuracy of each head segment, steps (k P, (k + 1) P], P the
  reset period (one segment without resets): a fresh head starts each segment."""
  segments: dict[int, list[float]] = {}
  for step, value in sorted((int(k), v) for k, v in history.items()):
    segments.setdefault((step - 1) // reset_every if reset_every else 0, []).append(value)
  return [(v[0], v[-1]) for _, v in sorted(segments.items())]


def _segments_cell(runs: list[dict]) -> str:
  """Per head segment, first -> last bit accuracy, each the mean over the runs."""
  per_run = [
      segment_accuracy(r["bit_accuracy"], r.get("reset_every_steps", 0))
      for r in runs
      if r.get("bit_accuracy")
  ]
  if not per_run:
    return ""
  count = min(len(p) for p in per_run)
  means = [np.mean([p[i] for p in per_run], axis=0) for i in range(count)]
  return ", ".join(f"{first:.3f} -> {last:.3f}" for first, last in means)


def markdown_table(rows: list[dict], methods) -> str:
  """One line per method: mean ± sample std over its seeds (n in the second column)."""
  header = (
      "| method | runs | "
      + " | ".join(c for c, _, _ in COLUMNS)
      + " | bit acc per head segment, first -> last |"
  )
  lines = [header, "|" + " --- |" * (len(COLUMNS) + 3)]
  for method in dict.fromkeys(["pixels", "random_init"] + list(methods)):  # each once
    mine = [r for r in rows if r["method"] == method]
    if not mine:
      continue
    cells = []
    for _, key, scale in COLUMNS:
      vals = [scale * r["metrics"][key] for r in mine if key in r["metrics"]]
      cells.append(_mean_std(vals))
    acc = _segments_cell(mine)
    label = {"pixels": "raw pixels", "random_init": "random init (BITS head)"}.get(
        method, LABELS.get(method, method)
    )
    lines.append(f"| {label} | {len(mine)} | " + " | ".join(cells) + f" | {acc} |")
  return "\n".join(lines) + "\n"


def load_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def save_rows(rows: list[dict], path: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, path)


def describe() -> str:
  return (
      f"Config `{_CONFIG.value}` (demo preset, `method=M`), {_STEPS.value or 'config'} steps "
      f"per run, seeds {','.join(_SEEDS.value)}, overrides {_SET.value or 'none'}. Every "
      f"evaluator uses {_TRAIN_SPLIT.value} (k-NN bank, probe training set {_PROBE_EPOCHS.value} "
      f"epochs, retrieval database) and {_TEST_SPLIT.value} (queries, probe test set, d_eff / "
      "r_eff): bounded for the CPU budget. Codes: the head's logits > 0 (BITS messages; SimDINO's "
      "embedding signs; DINO has none). mean ± std over seeds."
  )


def main(argv):
  del argv
  _FLAGS.mark_as_parsed()  # parsed through absl's FLAGS, which app.run filled
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs ~5 INFO lines per checkpoint
  os.makedirs(_WORKDIR.value, exist_ok=True)
  rows = load_rows(_RESULTS.value)
  for row in rows:  # rows cached before the key existed: the period their config gives
    if row.get("bit_accuracy") and "reset_every_steps" not in row:
      config = run_config(row["method"], row["seed"])
      row["reset_every_steps"] = int(config.objective.head.reset_every_steps or 0)
  done = {(r["method"], r["seed"]) for r in rows}
  if ("pixels", 0) not in done:
    rows.append(pixel_row())
    save_rows(rows, _RESULTS.value)
  if ("random_init", 0) not in done:
    rows.append(random_init_row())
    save_rows(rows, _RESULTS.value)
  for seed in (int(s) for s in _SEEDS.value):
    for method in _METHODS.value:
      if (method, seed) in done:
        continue
      print(f"== {method} seed {seed}", flush=True)
      rows.append(train_run(method, seed))
      save_rows(rows, _RESULTS.value)
      print(markdown_table(rows, _METHODS.value), flush=True)
  table = markdown_table(rows, _METHODS.value)
  print(table)
  with open(_README.value, "w") as f:
    f.write(
        "# Reproduction study (issue 12): Fashion-MNIST, equal budget per method\n\n"
        f"`python benchmarks/reproduce.py` ({describe()})\n\n{table}\n"
        "Bit accuracy: the student's, against the teacher's messages, per head segment (between\n"
        "resets; one segment for BITS-fixed), first and last logged value, mean over seeds.\n"
    )


if __name__ == "__main__":
  flags.FLAGS.append_flag_values(_FLAGS)
  app.run(main)
