"""`npz:/path/file.npz`: images and labels in one numpy archive.

Arrays: `images` [N, H, W(, C)] uint8, `labels` [N] int, optionally `ids`
[N] (str or int), and optionally `test_images` / `test_labels` / `test_ids`. Without the test
arrays the last 10% of the examples (in file order) form split 'test' and the first 90% form
'train'. Without `ids`, an example's id is its index in its array.
"""

from __future__ import annotations

import os

import numpy as np

from bits_jax.data.sources import core


def _held_out_start(n: int) -> int:
  """Number of leading examples that form 'train' when 'test' is held out."""
  return n - max(1, int(round(n * core.HELD_OUT_FRACTION))) if n > 1 else n


def _checked(images: np.ndarray, labels: np.ndarray, where: str):
  """images [n, h, w, c] uint8, labels [n] int64 after checking what the file holds."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{where}: images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"{where}: images must be uint8 in [0, 255], got {images.dtype}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"{where}: labels must be [N] with N={len(images)}, got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
  return images, labels.astype(np.int64)


@core.register("npz")
class NpzSource(core.DataSource):
  """A .npz file with 'images' and 'labels' (and optionally a test set)."""

  form = "'npz:/path/file.npz'"

  def __init__(self, arg, input_config):
    super().__init__(arg, input_config)
    self._arrays = None

  @classmethod
  def check(cls, arg, input_config):
    return core.path_problem(input_config, arg, directory=False)

  def _load(self) -> dict:
    if self._arrays is None:
      if not os.path.exists(self.arg):
        raise FileNotFoundError(
            f"npz file {self.arg} does not exist; config.input.dataset "
            "should be 'npz:/path/file.npz' with arrays 'images' and "
            "'labels'"
        )
      with np.load(self.arg) as f:
        arrays = {k: f[k] for k in f.files}
      for key in ("images", "labels"):
        if key not in arrays:
          raise ValueError(
              f"{self.arg} has arrays {sorted(arrays)} but needs 'images' "
              "[N, H, W(, C)] uint8 and 'labels' [N] int"
          )
      if ("test_images" in arrays) != ("test_labels" in arrays):
        have, lack = sorted(("test_images", "test_labels"), key=lambda k: k not in arrays)
        raise ValueError(
            f"{self.arg} has {have!r} but no {lack!r}: store both, or neither to hold out "
            "the last 10% of 'images' as 'test'"
        )
      self._arrays = arrays
    return self._arrays

  def _part(self, prefix: str):
    """(images, labels, ids) of the arrays 'images' ('') or 'test_images' ('test_')."""
    arrays = self._load()
    images, labels = _checked(
        arrays[prefix + "images"],
        arrays[prefix + "labels"],
        self.arg + (" (test)" if prefix else ""),
    )
    ids = arrays.get(prefix + "ids", np.arange(len(labels)))
    if len(ids) != len(labels):
      raise ValueError(
          f"{self.arg}: {prefix}ids must be [N] with N={len(labels)}, got shape {np.shape(ids)}"
      )
    return images, labels, np.asarray(ids)

  def _base_split(self, base: str):
    has_test = "test_images" in self._load()
    if base == "train":
      images, labels, ids = self._part("")
      keep = slice(None) if has_test else slice(0, _held_out_start(len(labels)))
    elif base == "test":
      images, labels, ids = self._part("test_" if has_test else "")
      keep = slice(None) if has_test else slice(_held_out_start(len(labels)), None)
    else:
      raise core.missing_split_error(
          f"npz:{self.arg}",
          base,
          ["train", "test"],
          "npz files provide 'train' and 'test' (the held-out 10% "
          "of 'images' unless 'test_images' is present).",
      )
    return images[keep], labels[keep], ids[keep]

  def open(self, split: str) -> core.ArraySplit:
    images, labels, ids = self._base_split(core.parse_split(split)[0])
    index = core.slice_indices(split, len(labels))
    return core.ArraySplit(images[index], labels[index], ids[index], name=split)

  def info(self) -> core.DatasetInfo:
    splits = {s: self._base_split(s) for s in ("train", "test")}
    arrays = self._load()
    labels = [arrays["labels"]] + ([arrays["test_labels"]] if "test_labels" in arrays else [])
    return core.DatasetInfo(
        name=self.dataset,
        num_classes=int(max(int(l.max()) for l in labels if len(l)) + 1),
        num_examples={k: len(v[1]) for k, v in splits.items()},
        image_shape=tuple(splits["train"][0].shape[1:]),
        source=self.kind,
    )
