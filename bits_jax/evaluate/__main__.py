"""Evaluate weights: python -m bits_jax.evaluate --workdir=DIR [--config=configs/x.py].

With --workdir the run's own config (DIR/config.json) is used, with any `--config.*`
overrides on top; --config (a config file) is needed only for --weights that do not come
with a config.json (e.g. converted weights). By default the latest checkpoint in --workdir
is evaluated (the EMA teacher); --weights points at any other run, checkpoint step or
converted params directory. --evals picks entries of config.evals (default: all). Results go
to --out (default DIR/eval): results.json, results.md, plots/*.png, TensorBoard events.
"""
import json
import os
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from bits_jax.evaluate import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (optional with "
                                          "--workdir: its config.json is used).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its checkpoints are used).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Other weights to evaluate instead.")
_WHICH = flags.DEFINE_enum("which", "teacher", ["teacher", "student"],
                           "Which network of a train-state checkpoint.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval).")
_EVALS = flags.DEFINE_list("evals", None, "config.evals entries to run (default: all).")


def _overridden_keys(argv) -> list[str]:
  """Dotted keys of the `--config.k=v` flags given on the command line."""
  return [arg[len("--config."):].split("=", 1)[0] for arg in argv
          if arg.startswith("--config.") and "=" in arg]


def run_config(workdir: str | None, argv) -> ml_collections.ConfigDict:
  """The run's config.json (with --config.* overrides) or the --config file's config."""
  stored = os.path.join(workdir, "config.json") if workdir else None
  if stored and os.path.exists(stored):
    with open(stored) as f:
      config = ml_collections.ConfigDict(json.load(f))
    config = _with_tuples(config)
    if _CONFIG.value is not None:
      for key in _overridden_keys(argv):
        *path, leaf = key.split(".")
        source, target = _CONFIG.value, config
        for part in path:
          source, target = source[part], target[part]
        target[leaf] = source[leaf]
    return config
  if _CONFIG.value is None:
    raise app.UsageError(f"No config.json in --workdir={workdir}: pass --config=FILE.py.")
  return _CONFIG.value


def _with_tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """JSON stores tuples as lists; the code (and the defaults' types) expect tuples."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _with_tuples(value)
    elif isinstance(value, list):
      with config.ignore_type():
        config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = os.path.abspath(_WORKDIR.value) if _WORKDIR.value else None
  weights = os.path.abspath(_WEIGHTS.value) if _WEIGHTS.value else workdir
  if not weights:
    raise app.UsageError("Give --workdir (a run to evaluate) or --weights.")
  config = run_config(workdir, sys.argv)
  out = os.path.abspath(_OUT.value) if _OUT.value else os.path.join(workdir or weights, "eval")
  results = run.evaluate(config, weights=weights, out_dir=out, which=_WHICH.value,
                         names=_EVALS.value)
  print(run.markdown_table(results))
  print(f"Wrote {out}/results.json and results.md")


if __name__ == "__main__":
  app.run(main)
