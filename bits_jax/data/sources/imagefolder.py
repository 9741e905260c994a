"""`imagefolder:/dir`: `/dir/<class>/<image>.{png,jpg,jpeg}`, labels = sorted class indices.

Optional `/dir/train`, `/dir/test`, `/dir/val`, `/dir/validation` sub-directories hold one
split each; otherwise every 10th file of the sorted listing forms 'test' and the rest 'train'.
Images stay encoded until the augmentation decodes them (JPEGs only inside the crop windows).
The stored channel count is the first image's: 1 for grayscale, else 3 (files of the other
kind are converted by the decoder). An example's id is its path relative to its split folder,
e.g. 'cat/00.jpg'. `config.input.skip_corrupt_images=True` decodes every file once at open
time and leaves out the undecodable ones (counted and logged).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

import numpy as np
import tensorflow as tf

from bits_jax.data.sources import core

_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLIT_DIRS = ("train", "test", "val", "validation")


def find_corrupt_files(paths, channels: int) -> np.ndarray:
  """Boolean mask [n] of the files that fail to decode (decodes every file)."""
  paths = np.asarray(paths, dtype=str)

  def decode(i, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    return i, tf.shape(image)[0]

  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  ok = np.zeros(len(paths), dtype=bool)
  for i, _ in ds.as_numpy_iterator():
    ok[i] = True
  return ~ok


def check_image_file(path: str, channels: int) -> Optional[str]:
  """The decode error of one image file, or None when it decodes."""
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
  except (tf.errors.OpError, ValueError) as e:
    message = getattr(e, "message", str(e)).strip().splitlines()[0]
    # TF wraps the reason: '{{function_node ...}} Input is empty. [Op:DecodeImage] name: '.
    return re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\].*$", "", message).rstrip(".") or message
  return None


def _image_channels(paths: np.ndarray) -> int:
  """1 when the first image is grayscale, else 3."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if paths.size == 0:
    return 3
  try:
    with Image.open(paths[0]) as im:
      return 1 if im.mode in ("L", "I", "I;16", "1") else 3
  except Exception:  # pylint: disable=broad-except  # Undecodable: found (and named) later.
    return 3


class FileSplit(core.Split):  # pylint: disable=abstract-method  # Random access: no stream().
  """Encoded image files. paths: [n] str, labels: [n] int64, ids: [n] str."""

  encoded = True
  random_access = True

  def __init__(self, paths, labels, ids, channels: int, name: str, skipped: tuple = ()):
    self.paths, self.labels, self.ids = paths, labels, ids
    self.channels, self.name = channels, name
    self.skipped = skipped  # Undecodable files left out (skip_corrupt_images=True).
    self.num_examples = len(labels)
    self._tensors = ()

  def lookup(self, index: tf.Tensor) -> dict:
    self._tensors = self._tensors or core.eager_constants(
        self.paths.astype(str), self.labels.astype(np.int32), self.ids
    )
    paths, labels, ids = self._tensors
    return {
        "image": tf.io.read_file(tf.gather(paths, index)),
        "label": tf.gather(labels, index),
        "id": tf.gather(ids, index),
    }

  def decode_error(self, index: int) -> Optional[str]:
    problem = check_image_file(self.paths[index], self.channels)
    return f"corrupt image {self.paths[index]}: {problem}" if problem else None


@core.register("imagefolder")
class ImageFolderSource(core.DataSource):
  """One sub-folder of images per class (optionally one folder per split above them)."""

  form = "'imagefolder:/dir'"

  def __init__(self, arg, input_config):
    super().__init__(arg, input_config)
    self.skip_corrupt = bool(input_config.skip_corrupt_images)

  @classmethod
  def check(cls, arg, input_config):
    return core.path_problem(input_config, arg, directory=True)

  def _layout(self) -> dict:
    """Split name -> directory of class folders ('' -> the root of a flat folder)."""
    if not os.path.isdir(self.arg):
      raise FileNotFoundError(
          f"image folder {self.arg} does not exist; config.input.dataset "
          "should be 'imagefolder:/dir' with one sub-folder of images per "
          "class"
      )
    split_dirs = {
        s: os.path.join(self.arg, s)
        for s in _SPLIT_DIRS
        if os.path.isdir(os.path.join(self.arg, s))
    }
    return split_dirs if "train" in split_dirs else {"": self.arg}

  def _classes(self, layout: dict) -> list[str]:
    directory = layout.get("train", layout.get(""))
    classes = sorted(
        d
        for d in os.listdir(directory)
        if os.path.isdir(os.path.join(directory, d)) and not d.startswith(".")
    )
    if not classes:
      raise ValueError(
          f"image folder {self.arg} has no class sub-folders; expected "
          "<root>/<class>/<image>.png|jpg"
      )
    return classes

  def _base_split(self, base: str):
    """(paths [n], labels [n] int64, ids [n] str) of a split without slicing."""
    layout = self._layout()
    classes = self._classes(layout)
    directory = layout.get(base, layout.get(""))
    if "" not in layout and base not in layout:
      raise core.missing_split_error(
          f"imagefolder:{self.arg}", base, layout, "Create <root>/<split>/<class>/ folders for it."
      )
    if "" in layout and base not in ("train", "test"):
      raise core.missing_split_error(
          f"imagefolder:{self.arg}",
          base,
          ["train", "test"],
          "Flat image folders are split into train (90%) and test "
          "(every 10th file); use <root>/<split>/<class>/ for more.",
      )
    ids, labels = [], []
    for label, name in enumerate(classes):
      class_dir = os.path.join(directory, name)
      if os.path.isdir(class_dir):
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(_EXTENSIONS))
        ids += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    ids, labels = np.array(ids, dtype=str), np.array(labels, dtype=np.int64)
    paths = np.array([os.path.join(directory, i) for i in ids], dtype=str)
    if "" in layout:
      if paths.size == 0:
        raise ValueError(f"image folder {self.arg} has no {'/'.join(_EXTENSIONS)} files")
      # A deterministic held-out set, class-balanced in expectation.
      held_out = np.arange(len(paths)) % int(round(1 / core.HELD_OUT_FRACTION)) == 0
      keep = held_out if base == "test" else ~held_out
      paths, labels, ids = paths[keep], labels[keep], ids[keep]
    return paths, labels, ids

  def _sliced(self, split: str):
    paths, labels, ids = self._base_split(core.parse_split(split)[0])
    index = core.slice_indices(split, len(labels))
    return paths[index], labels[index], ids[index]

  def open(self, split: str) -> FileSplit:
    paths, labels, ids = self._sliced(split)
    channels = _image_channels(paths)
    skipped = ()
    if self.skip_corrupt and len(paths):
      corrupt = find_corrupt_files(paths, channels)
      if corrupt.any():
        logging.warning(
            "skipping %d corrupt image(s) of %d in %s split %s, e.g. %s",
            corrupt.sum(),
            len(paths),
            self.arg,
            split,
            paths[corrupt][0],
        )
      skipped = tuple(str(p) for p in paths[corrupt])
      paths, labels, ids = paths[~corrupt], labels[~corrupt], ids[~corrupt]
    return FileSplit(paths, labels, ids, channels=channels, name=split, skipped=skipped)

  def count_corrupt(self, split: str) -> int:
    """Number of files of `split` that fail to decode."""
    paths, _, _ = self._sliced(split)
    return int(find_corrupt_files(paths, _image_channels(paths)).sum())

  def info(self) -> core.DatasetInfo:
    layout = self._layout()
    split_names = ["train", "test"] if "" in layout else sorted(layout)
    splits = {s: self._base_split(s) for s in split_names}
    return core.DatasetInfo(
        name=self.dataset,
        num_classes=len(self._classes(layout)),
        num_examples={s: len(v[1]) for s, v in splits.items()},
        image_shape=(None, None, _image_channels(splits[split_names[0]][0])),
        source=self.kind,
    )
