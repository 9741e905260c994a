"""Trained or converted weights: one resolver for a weights path, one loader, one writer.

Used by the evaluation (`--weights`), continued pre-training (`config.init_from`) and the
weight converter (`bits_jax.tools.convert`). Accepted sources, any `etils.epath` path (local,
relative, `gs://...`):
  - a run's workdir (holding `checkpoints/`) or its `checkpoints/` directory: the latest
    complete step;
  - one checkpoint step directory (`.../checkpoints/1200`) or its `default/` item;
  - a params directory (`save_params`, what the converter writes): an Orbax pytree
    {'backbone', 'head'?, 'batch_stats'?: {'backbone'}} and an optional `convert_meta.json`
    with the model settings the weights need.
From a train-state checkpoint the EMA teacher's params are used (the model DINO-style methods
evaluate); `which='student'` selects the student, and only that network's arrays are read.
A damaged checkpoint step (files differing from its `bits_manifest.json`, unreadable, or
non-finite values; see `bits_jax.checkpoint`) is skipped with a warning when a workdir or
`checkpoints/` directory is given (the newest intact step is used) and is an error when the
step itself is given; nothing is moved or deleted here (the trainer quarantines damaged
steps when it resumes). `adapt_params` (from
`bits_jax.models.adapt`) fits loaded params to a model of another input shape; `head_params`
checks a loaded projection head against the model's (continued SSL that keeps the head).
"""

import json
import os
import re
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from bits_jax.models import adapt

adapt_params = adapt.adapt_params
PyTree = Any
META_FILE = "convert_meta.json"
_PARAMS_KEYS = ("backbone", "head", "batch_stats")
# What a preset puts in `config.init_from` when the user must give the weights (e.g.
# configs/transfer.py): loading it is an error that says which override is missing.
REQUIRED = "required:"
# What marks a directory as a training run's (never replaced by `save_params`).
_RUN_MARKERS = ("checkpoints", "config.json")


class NoCheckpointError(FileNotFoundError):
  """A run workdir or checkpoints/ directory without a complete checkpoint."""


class DamagedCheckpointError(ValueError):
  """The checkpoint to load is damaged and no intact one can stand in for it."""


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` as an absolute epath (Orbax refuses relative paths); URLs are kept as they are."""
  p = epath.Path(path)
  return p if p.is_absolute() else p.absolute()


def _step_dirs(path: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir() if re.fullmatch(r"\d+", p.name) and p.is_dir())


def unset_problem(path: epath.PathLike) -> Optional[str]:
  """The error for a preset's REQUIRED marker in place of weights (None for a path)."""
  text = os.fspath(path)
  if text.startswith(REQUIRED):
    return f"config.init_from is not set: {text[len(REQUIRED):].strip()}"
  return None


def resolve_checkpoint(path: epath.PathLike) -> tuple[epath.Path, Optional[int]]:
  """(absolute directory holding the pytree, its step or None) for any accepted source."""
  return _candidates(_existing_directory(path))[0][0]


def _existing_directory(path: epath.PathLike) -> epath.Path:
  """`path` as an absolute directory; the error of an unusable path (unset, absent, a file)."""
  problem = unset_problem(path)
  if problem:
    raise ValueError(problem)
  p = absolute(path)
  if not p.exists():
    raise FileNotFoundError(
        f"Weights path {os.fspath(path)!r} does not exist: give a run workdir, a "
        "checkpoints/ directory, a checkpoint step directory or a converted params "
        "directory."
    )
  if not p.is_dir():
    raise ValueError(
        f"Weights path {os.fspath(path)!r} is a file: convert .pth / "
        ".safetensors files first with `python -m bits_jax.tools.convert`."
    )
  return p


def _candidates(p: epath.Path) -> tuple[list[tuple[epath.Path, Optional[int]]], bool]:
  """([(pytree directory, step or None)], newest first; whether older steps may stand in).

  For a workdir or its checkpoints/ directory every complete step, newest first (True);
  else the one directory given (False).
  """
  run_dir = (p / "checkpoints").is_dir() or p.name == "checkpoints"
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  steps = _step_dirs(p)
  if steps:
    complete = [s for s in reversed(steps) if (p / str(s) / "default").is_dir()]
    if not complete:
      raise NoCheckpointError(
          f"No complete checkpoint under {p} (step directories {steps} have no 'default/' item)."
      )
    return [(p / str(s) / "default", s) for s in complete], True
  if run_dir and not (p / "default").is_dir():
    raise NoCheckpointError(
        f"No checkpoint yet in {p}: train first (python -m bits_jax.main "
        f"--workdir={p.parent}) or give other weights (evaluate: --weights=DIR)."
    )
  if (p / "default").is_dir():
    p = p / "default"
  step = int(p.parent.name) if re.fullmatch(r"\d+", p.parent.name) else None
  return [(p, step)], False


def _tree_metadata(directory: epath.Path) -> dict:
  """The saved pytree's structure (Orbax metadata: no array is read)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(directory)
  finally:
    handler.close()
  tree = getattr(metadata, "tree", metadata)
  if not isinstance(tree, Mapping):
    raise ValueError(f"{directory} holds no pytree of named entries.")
  return dict(tree)


def _restore(directory: epath.Path, keys: tuple[str, ...], metadata: Mapping[str, Any]) -> dict:
  """The entries `keys` of the saved pytree as numpy (the other entries are not read)."""
  item = {k: metadata[k] for k in keys if k in metadata}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(
        directory,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )


def _manifest_problem(directory: epath.Path, step: Optional[int]) -> Optional[str]:
  """Why the files of checkpoint `step` differ from its manifest (None: intact or no manifest)."""
  if step is None or directory.name != "default":
    return None
  from bits_jax import checkpoint  # pylint: disable=g-import-not-at-top

  try:
    return checkpoint.manifest_problem(directory.parent)
  except FileNotFoundError:  # no manifest (older run, or stopped before it): judged at restore
    return None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _load_one(directory: epath.Path, step: Optional[int], which: str) -> PyTree:
  """The params of one pytree directory (see `load_params`); DamagedCheckpointError if the
  train checkpoint `step` is damaged."""

  def damaged(problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"Checkpoint step {step} in {directory.parent.parent} is damaged: {problem}"
    )

  problem = _manifest_problem(directory, step)
  if problem:
    raise damaged(problem)
  try:
    metadata = _tree_metadata(directory)
  except Exception as e:  # pylint: disable=broad-except  # unreadable metadata
    if step is None:
      raise
    raise damaged(f"Orbax cannot read its metadata ({type(e).__name__}: {_first_line(e)})") from e
  if "teacher_params" in metadata:  # a TrainState checkpoint: only the network asked for
    params_key, stats_key = {
        "teacher": ("teacher_params", "teacher_batch_stats"),
        "student": ("params", "batch_stats"),
    }[which]
    try:
      tree = _restore(directory, (params_key, stats_key), metadata)
    except Exception as e:  # pylint: disable=broad-except  # any read error is damage
      raise damaged(f"Orbax cannot restore it ({type(e).__name__}: {_first_line(e)})") from e
    params = dict(tree[params_key])
    if tree.get(stats_key):
      params["batch_stats"] = tree[stats_key]
    finite = all(
        np.isfinite(x).all()
        for x in jax.tree_util.tree_leaves(params)
        if np.issubdtype(np.asarray(x).dtype, np.inexact)
    )
    if not finite:
      raise damaged(f"its {which} params hold non-finite values")
  elif "backbone" in metadata:  # a params directory (converted weights)
    tree = _restore(directory, _PARAMS_KEYS, metadata)
    params = {k: v for k, v in tree.items() if k in _PARAMS_KEYS and v}
  else:
    raise ValueError(
        f"{directory} holds neither a train state nor a params dict with a "
        f"'backbone' entry (keys: {sorted(metadata)})."
    )
  return jax.tree_util.tree_map(np.asarray, params)


def load_params(path: epath.PathLike, which: str = "teacher") -> tuple[PyTree, Optional[int]]:
  """({'backbone', 'head'?, 'batch_stats'?} as numpy, step or None) from any source.

  'batch_stats' ({'backbone': running averages}) is present for BatchNorm backbones. From a
  workdir the newest intact checkpoint step (damaged newer ones skipped with a warning,
  left in place); `DamagedCheckpointError` when the step given, or every step, is damaged.
  """
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: use 'teacher' or 'student'.")
  candidates, fallback = _candidates(_existing_directory(path))
  damaged = []
  for directory, step in candidates:
    try:
      params = _load_one(directory, step, which)
    except DamagedCheckpointError as e:
      if not fallback:
        raise DamagedCheckpointError(
            f"{e}. Give another step directory, or the run's workdir to use its newest intact "
            "checkpoint (resuming the run with python -m bits_jax.main moves damaged steps to "
            "corrupt_checkpoints/)."
        ) from e
      damaged.append(step)
      logging.warning("%s; skipping it.", e)
      continue
    if damaged:
      logging.warning(
          "Using checkpoint step %s in %s, the newest intact one (damaged, skipped and left "
          "in place: %s).",
          step,
          directory.parent.parent,
          damaged,
      )
    return params, step
  where = candidates[0][0].parent.parent
  raise DamagedCheckpointError(
      f"Every checkpoint in {where} is damaged (steps {damaged}; the warnings above say how): "
      "train again, or give other weights."
  )


def _by_name(tree: PyTree) -> dict:
  return {
      jax.tree_util.keystr(k, simple=True, separator="/"): v
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def head_params(loaded: Mapping[str, Any], target: PyTree, source: str) -> PyTree:
  """The projection head of `loaded` (a `load_params` dict) as numpy, shaped like `target`.

  Unlike the backbone nothing is adapted: the head must be the same module with the same
  shapes (`target` holds arrays or `jax.ShapeDtypeStruct`s). ValueError, naming the config
  key to change, when `loaded` has no head (converted backbone-only weights, e.g. DINO's
  released backbones) or a head of another method or size. `source` names the weights.
  """
  if not loaded.get("head"):
    raise ValueError(
        f"The weights {source} have no projection head (converted backbone-only weights?): "
        "set config.init_from_head='reset' to start a fresh head on the loaded backbone."
    )
  flat_loaded, flat_target = _by_name(loaded["head"]), _by_name(target)
  have = {k: tuple(np.shape(v)) for k, v in flat_loaded.items()}
  want = {k: tuple(np.shape(v)) for k, v in flat_target.items()}
  if have != want:
    diff = sorted(set(have) ^ set(want)) or [k for k in want if have[k] != want[k]]
    name = diff[0]
    raise ValueError(
        f"The projection head of {source} does not match the model's: head/{name} is "
        f"{have.get(name, 'missing')} there and {want.get(name, 'missing')} here. Use the "
        "checkpoint's config.objective.name, objective.head.* and output size "
        "(objective.bits.num_bits / objective.dino.out_dim), or config.init_from_head='reset'."
    )
  leaves = [np.asarray(flat_loaded[k]).astype(t.dtype) for k, t in flat_target.items()]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def read_meta(path: epath.PathLike) -> dict:
  """The `convert_meta.json` of a params directory ({} for checkpoints and plain params)."""
  directory, _ = resolve_checkpoint(path)
  meta_file = directory / META_FILE
  return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def check_replaceable(directory: epath.PathLike) -> epath.Path:
  """`directory` (absolute) if `save_params` may write it; FileExistsError if not.

  It may be new, an empty directory or an earlier params export (a `convert_meta.json` and
  no `checkpoints/` or `config.json`), which is replaced. Anything else, a run's workdir
  above all, is never deleted.
  """
  directory = absolute(directory)
  if not directory.exists():
    return directory
  fix = "Pick a new output path (--out) or delete it yourself."
  if not directory.is_dir():
    raise FileExistsError(f"The output {directory} exists and is a file, not a directory. {fix}")
  names = {child.name for child in directory.iterdir()}
  if not names:
    return directory
  run_markers = sorted(names & set(_RUN_MARKERS))
  if META_FILE in names and not run_markers:
    return directory
  what = (
      f"it holds {' and '.join(run_markers)} (a training run's workdir?)"
      if run_markers
      else f"it is not empty and not an earlier params export (no {META_FILE})"
  )
  raise FileExistsError(f"Refusing to write into {directory}: {what}; it would be deleted. {fix}")


def save_params(
    directory: epath.PathLike, params: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None
) -> epath.Path:
  """Writes a params directory: `params` {'backbone', 'head'?, 'batch_stats'?} (+ meta).

  An earlier params export there is replaced; any other non-empty directory is refused
  (FileExistsError, see `check_replaceable`). Returns its absolute path.
  """
  unknown = sorted(set(params) - set(_PARAMS_KEYS))
  if "backbone" not in params or unknown:
    raise ValueError(
        f"params need a 'backbone' entry and only {_PARAMS_KEYS} (got {sorted(params)})."
    )
  directory = check_replaceable(directory)
  tree = {k: v for k, v in params.items() if v}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree, force=True)
    checkpointer.wait_until_finished()
  if meta is not None:
    (directory / META_FILE).write_text(json.dumps(dict(meta), indent=2))
  return directory
