"""Evaluate weights: python -m bits_jax.evaluate --workdir=DIR [--config=configs/x.py].

With --workdir the run's own config (DIR/config.json) is used. `--config.*` overrides go on
top of it; they need --config=FILE.py too (absl defines the override flags from that file;
only the overridden keys are taken from it). --config alone is needed only for --weights
that do not come with a config.json (e.g. converted weights). By default the latest
checkpoint in --workdir is evaluated (the EMA teacher); --weights points at any other run,
checkpoint step or converted params directory. --evals picks entries of config.evals
(default: all). Results go to --out (default DIR/eval): results.json, results.md, figures
(*.png), TensorBoard events. Paths may be any etils.epath path (relative, gs://...).
"""

from absl import app
from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

from bits_jax import weights as weights_lib
from bits_jax.evaluate import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (optional with --workdir: its config.json is used)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its checkpoints are used).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Other weights to evaluate instead.")
_WHICH = flags.DEFINE_enum(
    "which", "teacher", ["teacher", "student"], "Which network of a train-state checkpoint."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval).")
_EVALS = flags.DEFINE_list("evals", None, "config.evals entries to run (default: all).")


def run_config(workdir: epath.PathLike | None) -> ml_collections.ConfigDict:
  """The run's config.json (with --config.* overrides) or the --config file's config."""
  stored = epath.Path(workdir) / "config.json" if workdir else None
  if stored and stored.exists():
    config = run.config_from_json(stored.read_text())
    if _CONFIG.value is not None:
      # Every override syntax absl accepts (`--config.k=v`, `--config.k v`), parsed with the
      # types of the --config file's fields.
      for key, value in config_flags.get_override_values(flags.FLAGS["config"]).items():
        *path, leaf = key.split(".")
        target = config
        for part in path:
          if part not in target:
            raise app.UsageError(f"--config.{key}: {stored} has no section {part!r}.")
          target = target[part]
        target[leaf] = value
    return config
  if _CONFIG.value is None:
    raise app.UsageError(f"No config.json in --workdir={workdir}: pass --config=FILE.py.")
  return _CONFIG.value


def _check_names(config: ml_collections.ConfigDict, names) -> None:
  """--evals must name config.evals entries (an unknown one would silently evaluate nothing)."""
  unknown = [n for n in names or () if n not in config.evals]
  if unknown:
    raise app.UsageError(
        f"--evals={','.join(unknown)}: not in config.evals; use some of {','.join(config.evals)}."
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = weights_lib.absolute(_WORKDIR.value) if _WORKDIR.value else None
  weights = weights_lib.absolute(_WEIGHTS.value) if _WEIGHTS.value else workdir
  if not weights:
    raise app.UsageError("Give --workdir (a run to evaluate) or --weights.")
  config = run_config(workdir)
  _check_names(config, _EVALS.value)
  out = weights_lib.absolute(_OUT.value) if _OUT.value else (workdir or weights) / "eval"
  results = run.evaluate(
      config, weights=weights, out_dir=out, which=_WHICH.value, names=_EVALS.value
  )
  print(run.markdown_table(results))
  print(f"Wrote {out}/results.json and results.md")


if __name__ == "__main__":
  app.run(main)
