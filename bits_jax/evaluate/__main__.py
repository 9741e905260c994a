"""Evaluate weights: python -m bits_jax.evaluate --workdir=DIR [--config=configs/x.py].

The run's own config is used: DIR/config.json with --workdir; with --weights alone, the
config.json next to them (in it or up to three directories above: a step directory's run).
`--config.*` overrides go on top of it; they need --config=FILE.py too (absl defines the
override flags from that file; only the overridden keys are taken from it, and keys the
file lacks, e.g. `--config.evals.linear.hidden_dim=256`, are added). --weights with --config
(and no --workdir) evaluates those weights under the --config file's config, e.g. converted
weights or another run's on another dataset. By default the
latest intact checkpoint in --workdir is evaluated (the EMA teacher; a damaged newer step is
skipped with a warning and left in place); --weights points at any other run, checkpoint
step or converted params directory. --evals picks entries of config.evals (default: all).
Results go to --out (default DIR/eval): results.json, results.md, figures (*.png),
TensorBoard events. Paths may be any etils.epath path (relative, gs://...). Unusable weights
(no checkpoint yet, damaged) end the run with a one-line error and exit status 1.
"""

from absl import app
from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

from bits_jax import loading
from bits_jax import utils
from bits_jax import weights as weights_lib
from bits_jax.evaluate import run

_CONFIG = utils.define_config_flag(
    "Config file (optional when the weights come with a config.json: it is used)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its checkpoints are used).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Other weights to evaluate instead.")
_WHICH = flags.DEFINE_enum(
    "which", "teacher", ["teacher", "student"], "Which network of a train-state checkpoint."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval).")
_EVALS = flags.DEFINE_list("evals", None, "config.evals entries to run (default: all).")


def _stored_config_file(
    workdir: epath.PathLike | None, weights: epath.PathLike | None
) -> tuple[epath.Path | None, list[epath.Path]]:
  """(the run's config.json or None, the directories searched): --workdir, then --weights
  when no --config is given (with one, other weights are evaluated under that config)."""
  searched = []
  if workdir:
    searched.append(epath.Path(workdir))
    if (searched[0] / "config.json").exists():
      return searched[0] / "config.json", searched
  if (
      _CONFIG.value is None
      and weights
      and (not workdir or epath.Path(weights) != epath.Path(workdir))
  ):
    searched += loading.stored_config_dirs(weights)
    found = loading.find_stored_config(weights)
    if found is not None:
      return found, searched
  return None, searched


def run_config(
    workdir: epath.PathLike | None, weights: epath.PathLike | None = None
) -> ml_collections.ConfigDict:
  """The run's config.json (with --config.* overrides) or the --config file's config.

  The config.json is DIR/config.json of --workdir, else the one next to `weights` (see
  `bits_jax.loading.find_stored_config`).
  """
  stored, searched = _stored_config_file(workdir, weights)
  if stored is not None:
    config = run.config_from_json(stored.read_text())
    if _CONFIG.value is not None:
      # Every override syntax absl accepts (`--config.k=v`, `--config.k v`), parsed with the
      # types of the --config file's fields; keys the stored config lacks are added.
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
    given = " and ".join(
        f"--{name}={value}"
        for name, value in (("workdir", workdir), ("weights", weights))
        if value and (name == "workdir" or value != workdir)
    )
    raise app.UsageError(
        f"No config.json in {given} (searched {', '.join(str(d) for d in searched)}): pass "
        "--config=FILE.py (the config the weights were trained with)."
    )
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
  utils.quiet_absl_logging()
  workdir = weights_lib.absolute(_WORKDIR.value) if _WORKDIR.value else None
  weights = weights_lib.absolute(_WEIGHTS.value) if _WEIGHTS.value else workdir
  if not weights:
    raise app.UsageError("Give --workdir (a run to evaluate) or --weights.")
  config = run_config(workdir, weights)
  _check_names(config, _EVALS.value)
  try:
    weights_lib.resolve_checkpoint(weights)  # before anything is built: no checkpoint yet?
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"evaluate: {e}") from e
  out = weights_lib.absolute(_OUT.value) if _OUT.value else (workdir or weights) / "eval"
  try:
    results = run.evaluate(
        config, weights=weights, out_dir=out, which=_WHICH.value, names=_EVALS.value
    )
  except weights_lib.DamagedCheckpointError as e:
    raise SystemExit(f"evaluate: {e}") from e
  print(run.markdown_table(results))
  print(f"Wrote {out}/results.json and results.md")


if __name__ == "__main__":
  app.run(main, flags_parser=utils.parse_flags)
