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
evaluate); `which='student'` selects the student. `adapt_params` (from
`bits_jax.models.adapt`) fits loaded params to a model of another input shape; `head_params`
checks a loaded projection head against the model's (continued SSL that keeps the head).
"""

import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bits_jax.models import adapt

adapt_params = adapt.adapt_params
PyTree = Any
META_FILE = "convert_meta.json"
_PARAMS_KEYS = ("backbone", "head", "batch_stats")
# What a preset puts in `config.init_from` when the user must give the weights (e.g.
# configs/transfer.py): loading it is an error that says which override is missing.
REQUIRED = "required:"


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` as an absolute epath (Orbax refuses relative paths); URLs are kept as they are."""
  p = epath.Path(path)
  return p if p.is_absolute() else p.absolute()


def _step_dirs(path: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir() if re.fullmatch(r"\d+", p.name) and p.is_dir())


def resolve_checkpoint(path: epath.PathLike) -> tuple[epath.Path, Optional[int]]:
  """(absolute directory holding the pytree, its step or None) for any accepted source."""
  if os.fspath(path).startswith(REQUIRED):
    raise ValueError(f"config.init_from is not set: {os.fspath(path)[len(REQUIRED):].strip()}")
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
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  steps = _step_dirs(p)
  if steps:
    for step in reversed(steps):
      if (p / str(step) / "default").is_dir():
        return p / str(step) / "default", step
    raise FileNotFoundError(
        f"No complete checkpoint under {p} (step directories {steps} have no 'default/' item)."
    )
  if (p / "default").is_dir():
    p = p / "default"
  step = int(p.parent.name) if re.fullmatch(r"\d+", p.parent.name) else None
  return p, step


def load_params(path: epath.PathLike, which: str = "teacher") -> tuple[PyTree, Optional[int]]:
  """({'backbone', 'head'?, 'batch_stats'?} as numpy, step or None) from any source.

  'batch_stats' ({'backbone': running averages}) is present for BatchNorm backbones.
  """
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: use 'teacher' or 'student'.")
  directory, step = resolve_checkpoint(path)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(directory)
  if "teacher_params" in tree:  # a TrainState checkpoint
    params_key, stats_key = {
        "teacher": ("teacher_params", "teacher_batch_stats"),
        "student": ("params", "batch_stats"),
    }[which]
    params = dict(tree[params_key])
    if tree.get(stats_key):
      params["batch_stats"] = tree[stats_key]
  elif "backbone" in tree:  # a params directory (converted weights)
    params = {k: v for k, v in tree.items() if k in _PARAMS_KEYS and v}
  else:
    raise ValueError(
        f"{directory} holds neither a train state nor a params dict with a "
        f"'backbone' entry (keys: {sorted(tree)})."
    )
  return jax.tree_util.tree_map(np.asarray, params), step


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


def save_params(
    directory: epath.PathLike, params: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None
) -> epath.Path:
  """Writes a params directory: `params` {'backbone', 'head'?, 'batch_stats'?} (+ meta).

  An existing directory is replaced. Returns its absolute path.
  """
  unknown = sorted(set(params) - set(_PARAMS_KEYS))
  if "backbone" not in params or unknown:
    raise ValueError(
        f"params need a 'backbone' entry and only {_PARAMS_KEYS} (got {sorted(params)})."
    )
  directory = absolute(directory)
  tree = {k: v for k, v in params.items() if v}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree, force=True)
    checkpointer.wait_until_finished()
  if meta is not None:
    (directory / META_FILE).write_text(json.dumps(dict(meta), indent=2))
  return directory
