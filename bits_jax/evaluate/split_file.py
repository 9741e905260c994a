"""Named subsets of a dataset from split files: one image id per line.

A split file lists image ids, one per line; the id is the line's first whitespace-separated
field, so `n01440764/n01440764_10026.JPEG 0` (id and label) and plain ids both work. Blank
lines and lines starting with `#` are ignored. Ids are matched exactly (after decoding bytes)
against the dataset's ids, e.g. the 'id' feature of an evaluation split: use the same naming
in the file as the dataset uses (file name, or path relative to the image root).

A class list (e.g. the 100 WordNet ids of ImageNet100) is read the same way and selects the
images of those classes by the class token of their ids: the part before the first '/' or
'_' ('n01440764/x.JPEG' of an image folder, 'n01440764_10026.JPEG' of TFDS imagenet2012).
"""

import re
from typing import Sequence

import numpy as np


def read_split_file(path: str) -> list[str]:
  """The ids listed in `path`, in file order."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  ids = []
  for line in epath.Path(path).read_text().splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      ids.append(line.split()[0])
  if not ids:
    raise ValueError(f"split file {path} lists no ids: expected one image id per line.")
  return ids


def _as_str(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def select_by_ids(ids_of_dataset: Sequence, wanted: Sequence[str]) -> np.ndarray:
  """Row indices [len(wanted)] int64 of `wanted` ids in `ids_of_dataset`, in `wanted` order.

  Raises:
    ValueError: an id is missing from the dataset (the first missing one is named), listed
      twice in `wanted`, or not unique in the dataset.
  """
  position: dict[str, int] = {}
  for i, key in enumerate(ids_of_dataset):
    key = _as_str(key)
    if key in position:
      raise ValueError(
          f"id {key!r} appears twice in the dataset (rows {position[key]} and "
          f"{i}): ids must be unique to select rows by id."
      )
    position[key] = i
  out, seen = [], set()
  missing = [_as_str(w) for w in wanted if _as_str(w) not in position]
  if missing:
    example = next(iter(position), None)
    raise ValueError(
        f"{len(missing)} of {len(wanted)} ids are not in the dataset, the first "
        f"being {missing[0]!r} (dataset ids look like {example!r}): check the "
        "split file against the dataset and split."
    )
  for w in wanted:
    w = _as_str(w)
    if w in seen:
      raise ValueError(f"id {w!r} is listed twice: remove the duplicate line.")
    seen.add(w)
    out.append(position[w])
  return np.asarray(out, np.int64)


def class_of_id(image_id) -> str:
  """The class token of an id: 'n01440764/a.JPEG' and 'n01440764_10026.JPEG' -> 'n01440764'."""
  return re.split(r"[/_]", _as_str(image_id), maxsplit=1)[0]


def select_by_classes(ids_of_dataset: Sequence, classes: Sequence[str]) -> np.ndarray:
  """Row indices [k] int64, in dataset order, of the ids whose class token is in `classes`.

  Raises:
    ValueError: a listed class has no image (the first such class is named).
  """
  tokens = np.array([class_of_id(i) for i in ids_of_dataset], dtype=object)
  wanted = [_as_str(c) for c in classes]
  present = set(tokens.tolist())
  missing = [c for c in wanted if c not in present]
  if missing:
    example = tokens[0] if len(tokens) else None
    raise ValueError(
        f"{len(missing)} of {len(wanted)} classes have no image in the dataset, the first "
        f"being {missing[0]!r} (class tokens of the dataset's ids look like {example!r}): "
        "check the class list against the dataset."
    )
  return np.flatnonzero(np.isin(tokens, np.array(wanted, dtype=object))).astype(np.int64)
