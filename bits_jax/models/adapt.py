"""Pretrained backbone params adapted to a model of another input shape.

Where the change is well defined:
  - patch-embedding input channels: RGB -> grayscale sums the kernel over channels (exact for
    a gray image replicated to RGB); grayscale -> RGB divides by the channel count and
    repeats;
  - ViT position-embedding grid: bilinear resize to the target grid (`vit.resize_pos_embed`).
Any other shape mismatch is an error naming the parameter.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bits_jax.models import vit

PyTree = Any


def _adapt_leaf(name: str, loaded: np.ndarray, target) -> np.ndarray:
  loaded = np.asarray(loaded)
  if loaded.shape == tuple(target.shape):
    return loaded.astype(target.dtype)
  if (
      name.endswith("patch_embed/kernel")
      and loaded.ndim == 4
      and loaded.shape[:2] == tuple(target.shape[:2])
      and loaded.shape[3] == target.shape[3]
  ):
    c_in, c_out = loaded.shape[2], target.shape[2]
    if c_out == 1:
      return loaded.sum(axis=2, keepdims=True).astype(target.dtype)
    if c_in == 1:
      return np.repeat(loaded / c_out, c_out, axis=2).astype(target.dtype)
  if name.endswith("pos_embed") and loaded.ndim == 3 and loaded.shape[2] == target.shape[2]:
    side = int(round(target.shape[1] ** 0.5))
    resized = vit.resize_pos_embed(jnp.asarray(loaded), (side, side))
    return np.asarray(resized).reshape(target.shape).astype(target.dtype)
  raise ValueError(
      f"Pretrained parameter {name} has shape {loaded.shape}, the model "
      f"expects {tuple(target.shape)}: use the same architecture "
      "(config.model / patch_size / bits) as the pretrained weights."
  )


def _by_name(tree: PyTree) -> dict:
  return {
      jax.tree_util.keystr(k, simple=True, separator="/"): v
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def adapt_params(loaded: PyTree, target: PyTree) -> PyTree:
  """`loaded` (numpy) reshaped onto the structure, shapes and dtypes of `target`.

  `target` may hold arrays or `jax.ShapeDtypeStruct`s; entries of `loaded` that `target`
  lacks (e.g. a classifier) are dropped, entries `target` has and `loaded` lacks are an error.
  """
  flat_target, flat_loaded = _by_name(target), _by_name(loaded)
  missing = sorted(set(flat_target) - set(flat_loaded))
  if missing:
    raise ValueError(
        f"Pretrained weights lack {len(missing)} parameters of the model, "
        f"e.g. {missing[:3]}: check config.model against the checkpoint."
    )
  leaves = [_adapt_leaf(name, flat_loaded[name], leaf) for name, leaf in flat_target.items()]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
