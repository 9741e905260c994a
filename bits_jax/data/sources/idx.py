"""`idx:/dir`: the IDX files of MNIST-like datasets (`train-*`, `t10k-*` = 'test').

The directory holds `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
`t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` (the Debian package
`dataset-fashion-mnist` installs Fashion-MNIST's in /usr/share/datasets/fashion-mnist).
Ids are the example indices in the base split.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

from bits_jax.data.sources import core

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _path(directory: str, stem: str) -> Optional[str]:
  for candidate in (stem + ".gz", stem):
    path = os.path.join(directory, candidate)
    if os.path.exists(path):
      return path
  return None


def available(directory: Optional[str]) -> bool:
  """Whether `directory` holds the IDX train files."""
  return bool(directory) and all(_path(directory, stem) for stem in _FILES["train"])


def read_idx(path: str) -> np.ndarray:
  """One IDX file (optionally gzip-compressed) as a numpy array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an IDX file (bad magic number)")
  dtype_code, ndim = data[2], data[3]
  if dtype_code not in _DTYPES:
    raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, dtype=_DTYPES[dtype_code], offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(
        f"{path}: expected {int(np.prod(shape))} values for shape {shape}, "
        f"found {array.size} (truncated file?)"
    )
  return array.reshape(shape)


@core.register("idx")
class IdxSource(core.DataSource):
  """IDX files in one directory."""

  form = "'idx:/dir'"

  @classmethod
  def check(cls, arg, input_config):
    problem = core.path_problem(input_config, arg, directory=True)
    if problem is None and not available(arg):
      problem = (
          f"config.input.dataset={input_config.dataset!r}: {arg} has no "
          f"{' and '.join(_FILES['train'])} (optionally .gz); point it at the directory "
          "that holds the IDX files."
      )
    return problem

  def _base_split(self, base: str) -> tuple[np.ndarray, np.ndarray]:
    """images [n, h, w, 1] uint8, labels [n] int64 of 'train' or 'test'."""
    if base not in _FILES:
      raise core.missing_split_error(
          f"idx:{self.arg}", base, _FILES, "IDX directories hold train-* and t10k-* (test) files."
      )
    paths = [_path(self.arg, stem) for stem in _FILES[base]]
    if not all(paths):
      fix = (
          "point config.input.dataset='idx:/dir' at the directory that holds them"
          if self.dataset.startswith("idx:")
          else (
              "on Debian install dataset-fashion-mnist or point config.input.idx_dir at a "
              "copy of them"
          )
      )
      raise FileNotFoundError(
          f"IDX files {_FILES[base]} (optionally .gz) not found in {self.arg}; {fix}"
      )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim == 3:
      images = images[..., None]
    return images.astype(np.uint8), labels.astype(np.int64)

  def open(self, split: str) -> core.ArraySplit:
    images, labels = self._base_split(core.parse_split(split)[0])
    index = core.slice_indices(split, len(labels))
    return core.ArraySplit(images[index], labels[index], index, name=split)

  def info(self) -> core.DatasetInfo:
    splits = {  # 'train' is required (a clear error when missing), 'test' optional.
        s: self._base_split(s)
        for s, (images, _) in _FILES.items()
        if s == "train" or _path(self.arg, images)
    }
    num_classes = int(max(labels.max() for _, labels in splits.values() if len(labels)) + 1)
    return core.DatasetInfo(
        name=self.dataset,
        num_classes=num_classes,
        num_examples={k: len(v[1]) for k, v in splits.items()},
        image_shape=tuple(splits["train"][0].shape[1:]),
        source=self.kind,
    )
