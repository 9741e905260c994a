"""Evaluate weights: python -m bits_jax.evaluate --config=configs/x.py --workdir=DIR.

By default evaluates the latest checkpoint in --workdir (the EMA teacher); --weights points
at any other run, checkpoint step or converted params directory. Results go to
--out (default DIR/eval): results.json, results.md, plots/*.png, TensorBoard events.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from bits_jax.evaluate import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its checkpoints are used).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Other weights to evaluate instead.")
_WHICH = flags.DEFINE_enum("which", "teacher", ["teacher", "student"],
                           "Which network of a train-state checkpoint.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  weights = _WEIGHTS.value or _WORKDIR.value
  if not weights:
    raise app.UsageError("Give --workdir (a run to evaluate) or --weights.")
  out = _OUT.value or f"{(_WORKDIR.value or weights).rstrip('/')}/eval"
  results = run.evaluate(_CONFIG.value, weights=weights, out_dir=out, which=_WHICH.value)
  print(run.markdown_table(results))
  print(f"Wrote {out}/results.json and results.md")


if __name__ == "__main__":
  app.run(main)
