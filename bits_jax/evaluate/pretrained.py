"""Loading trained weights for evaluation or continued pre-training (`config.init_from`).

Accepted sources (a path, local or GCS):
  - a run's workdir (holding `checkpoints/`) or its `checkpoints/` directory: the latest step;
  - one checkpoint step directory (`.../checkpoints/1200`) or its `default/` item;
  - a params directory written by Orbax's StandardCheckpointer holding {'backbone', 'head'?}
    (what `python -m bits_jax.models.convert` writes for converted PyTorch weights).
From a train-state checkpoint the EMA teacher's params are used (the model DINO-style methods
evaluate); `which='student'` selects the student.

Loaded weights are adapted to the target model where the change is well defined:
  - patch-embedding input channels: RGB -> grayscale sums the kernel over channels (exact for
    a gray image replicated to RGB); grayscale -> RGB divides by 3 and repeats;
  - position-embedding grid: bilinear resize to the target grid.
Any other shape mismatch is an error naming the parameter.
"""
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any


def _step_dirs(path: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir()
                if p.is_dir() and re.fullmatch(r"\d+", p.name))


def resolve_checkpoint(path: str) -> tuple[str, Optional[int]]:
  """(directory holding the pytree, step or None) for any accepted source path."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(
        f"init_from/weights path {path!r} does not exist: give a run workdir, a "
        f"checkpoints/ directory, a checkpoint step directory or a converted params "
        f"directory.")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  steps = _step_dirs(p)
  if steps:
    for step in reversed(steps):
      step_dir = p / str(step)
      if (step_dir / "default").is_dir():
        return os.fspath(step_dir / "default"), step
    raise FileNotFoundError(f"No complete checkpoint under {p}.")
  if (p / "default").is_dir():
    p = p / "default"
  step = int(p.parent.name) if re.fullmatch(r"\d+", p.parent.name) else None
  return os.fspath(p), step


def load_params(path: str, which: str = "teacher") -> tuple[PyTree, Optional[int]]:
  """({'backbone', 'head'?, 'batch_stats'?} as numpy, step or None) from any source.

  'batch_stats' ({'backbone': running averages}) is present for BatchNorm backbones.
  """
  directory, step = resolve_checkpoint(path)
  tree = ocp.StandardCheckpointer().restore(directory)
  if "teacher_params" in tree:  # a TrainState checkpoint
    params_key, stats_key = {"teacher": ("teacher_params", "teacher_batch_stats"),
                             "student": ("params", "batch_stats")}[which]
    params = dict(tree[params_key])
    if tree.get(stats_key):
      params["batch_stats"] = tree[stats_key]
  elif "backbone" in tree:  # converted weights
    params = {k: v for k, v in tree.items() if k in ("backbone", "head", "batch_stats")}
    if not params.get("batch_stats"):
      params.pop("batch_stats", None)
  else:
    raise ValueError(f"{directory} holds neither a train state nor a params dict with a "
                     f"'backbone' entry (keys: {sorted(tree)}).")
  return jax.tree_util.tree_map(np.asarray, params), step


def _adapt_leaf(name: str, loaded: np.ndarray, target) -> np.ndarray:
  if loaded.shape == tuple(target.shape):
    return loaded.astype(target.dtype)
  if name.endswith("patch_embed/kernel") and loaded.shape[:2] == target.shape[:2] and \
      loaded.shape[3] == target.shape[3]:
    c_in, c_out = loaded.shape[2], target.shape[2]
    if c_out == 1:
      return loaded.sum(axis=2, keepdims=True).astype(target.dtype)
    if c_in == 1:
      return np.repeat(loaded / c_out, c_out, axis=2).astype(target.dtype)
  if name.endswith("pos_embed") and loaded.ndim == 3 and loaded.shape[2] == target.shape[2]:
    side_in, side_out = int(round(loaded.shape[1] ** 0.5)), int(round(target.shape[1] ** 0.5))
    grid = loaded.reshape(1, side_in, side_in, loaded.shape[2])
    grid = jax.image.resize(jnp.asarray(grid), (1, side_out, side_out, loaded.shape[2]),
                            method="bilinear")
    return np.asarray(grid).reshape(target.shape).astype(target.dtype)
  raise ValueError(f"Pretrained parameter {name} has shape {loaded.shape}, the model "
                   f"expects {tuple(target.shape)}: use the same architecture "
                   f"(config.model / patch_size / bits) as the pretrained weights.")


def adapt_params(loaded: PyTree, target: PyTree) -> PyTree:
  """`loaded` reshaped onto the structure and shapes of `target` (see module docstring)."""
  flat_target = {jax.tree_util.keystr(k, simple=True, separator="/"): v
                 for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  flat_loaded = {jax.tree_util.keystr(k, simple=True, separator="/"): v
                 for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  missing = sorted(set(flat_target) - set(flat_loaded))
  if missing:
    raise ValueError(f"Pretrained weights lack {len(missing)} parameters of the model, "
                     f"e.g. {missing[:3]}: check config.model against the checkpoint.")
  adapted = {name: _adapt_leaf(name, flat_loaded[name], leaf)
             for name, leaf in flat_target.items()}
  leaves = [adapted[jax.tree_util.keystr(k, simple=True, separator="/")]
            for k, _ in jax.tree_util.tree_flatten_with_path(target)[0]]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
