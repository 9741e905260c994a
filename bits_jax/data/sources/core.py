"""The data-source interface, its registry and `get(input_config)`.

`config.input.dataset` names a source: `kind:argument` for a registered kind (`idx:/dir`,
`npz:/file.npz`, `imagefolder:/dir`) and a bare TFDS name (`cifar10`, `voc/2012`,
`imagenet2012:5.1.0`) otherwise. A source has one small interface:

  DataSource.open(split) -> Split    one split; TFDS slicing allowed ('train[:10%]', 'test[5:9]')
  DataSource.info() -> DatasetInfo   classes, split sizes, stored image shape, multi-label
  DataSource.check(arg, input)       cheap validation (no download, no decoding) -> problem

A `Split` is read either by random access (`random_access=True`: `lookup(index)`, index
arithmetic makes the train stream resumable for free) or as a stream of records
(`stream(...)`, TFDS). Both give records

  {'image': uint8 [h, w, c] (or a scalar string of encoded bytes when `Split.encoded`),
   'label': int32 [] (or bool [num_classes] multi-hot when `DatasetInfo.multi_label`),
   'id': string [] (a per-example id: file name, TFDS id or index in the base split; streams
         give it when asked, `with_ids`)}

where `c = Split.channels` (the stored channels; the streams convert them to
`config.input.num_channels`).

A new source is one module defining a `DataSource` subclass decorated with
`@register("kind")`, imported in `sources/__init__.py`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import re
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

HELD_OUT_FRACTION = 0.1  # npz files and flat image folders: the share that forms 'test'


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and evaluation need to know about a dataset."""

  name: str
  num_classes: int
  num_examples: dict  # split name -> number of examples
  image_shape: tuple  # (H, W, C) as stored; H and W are None for variable-size images
  source: str  # the registry kind: 'tfds', 'idx', 'npz', 'imagefolder'
  multi_label: bool = False  # labels are multi-hot [num_classes] (e.g. TFDS voc, coco)

  @property
  def channels(self) -> int:
    """Stored channels."""
    return int(self.image_shape[-1])


class Split(abc.ABC):
  """One split of a source, as the train and eval streams read it.

  Attributes (set by subclasses):
    name: the split as requested, e.g. 'train[:10%]'.
    num_examples: examples in the split.
    channels: channels of the stored images.
    encoded: records hold encoded image bytes (decoded in the augmentation) rather than
      uint8 arrays.
    random_access: read with `lookup` (True) or `stream` (False).
    batch_lookup: `lookup` also takes indices [b] and returns records stacked along a new
      first axis (images of one static size, decoded).
  """

  name: str
  num_examples: int
  channels: int
  encoded: bool
  random_access: bool
  batch_lookup: bool = False

  def lookup(self, index: tf.Tensor) -> dict:
    """Record of example `index` (int64 scalar tensor), for random-access splits."""
    raise NotImplementedError(f"{type(self).__name__} is streamed: use stream()")

  def shard_size(self, process_index: int, process_count: int) -> int:
    """Examples in this process's even shard, for streamed splits."""
    raise NotImplementedError(f"{type(self).__name__} is random access: use lookup()")

  def stream(
      self,
      process_index: int,
      process_count: int,
      *,
      shuffle_seed: Optional[int],
      options: tf.data.Options,
      with_ids: bool = False,
  ) -> tf.data.Dataset:
    """Records of this process's even shard, for streamed splits ('id' only `with_ids`).

    The shard is read in order when `shuffle_seed` is None, else file- and read-shuffled
    deterministically by that seed.
    """
    raise NotImplementedError(f"{type(self).__name__} is random access: use lookup()")

  def decode_error(self, index: int) -> Optional[str]:
    """Why example `index` fails to decode (None when it decodes or cannot fail)."""
    del index


class ArraySplit(Split):  # pylint: disable=abstract-method  # Random access: no stream().
  """Decoded images in memory (IDX, npz). images: [n, h, w, c] uint8, labels: [n] int."""

  encoded = False
  random_access = True
  batch_lookup = True

  def __init__(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, name: str):
    self.images, self.labels, self.ids, self.name = images, labels, ids, name
    self.num_examples = len(labels)
    self.channels = int(images.shape[-1])
    self._tensors = ()

  def lookup(self, index: tf.Tensor) -> dict:
    """Record of example `index` (int64 scalar), or records stacked for indices [b]."""
    self._tensors = self._tensors or eager_constants(
        self.images, self.labels.astype(np.int32), self.ids.astype(str)
    )
    images, labels, ids = self._tensors
    return {
        "image": tf.gather(images, index),
        "label": tf.gather(labels, index),
        "id": tf.gather(ids, index),
    }


def eager_constants(*arrays: np.ndarray) -> tuple[tf.Tensor, ...]:
  """Eager tensors of `arrays`, also when called inside a tf.data function being traced.

  Lookup tables built once this way are captured by every tf.data function that uses them.
  """
  with tf.init_scope():  # pylint: disable=not-context-manager
    return tuple(tf.constant(a) for a in arrays)


def path_problem(input_config, path: str, *, directory: bool) -> Optional[str]:
  """A `check` problem when the file (or directory) `path` does not exist."""
  if os.path.isdir(path) if directory else os.path.isfile(path):
    return None
  return (
      f"config.input.dataset={input_config.dataset!r}: {'directory' if directory else 'file'} "
      f"{path} does not exist; use {accepted_forms()}."
  )


class DataSource(abc.ABC):
  """A dataset behind `config.input.dataset`.

  Subclasses set `kind` (through `register`) and `form` (how users write it, for errors).
  """

  kind: str = ""
  form: str = ""

  def __init__(self, arg: str, input_config):
    """arg: the text after 'kind:' (the TFDS name for TFDS); input_config: config.input."""
    self.arg = arg
    self.dataset = str(input_config.dataset)

  @classmethod
  def create(cls, arg: str, input_config) -> "DataSource":
    """The source for `arg` (a source may hand over to another one, e.g. a fallback)."""
    return cls(arg, input_config)

  @classmethod
  def check(cls, arg: str, input_config) -> Optional[str]:
    """A problem with `arg` found without reading the data (None when none)."""
    del arg, input_config

  @abc.abstractmethod
  def open(self, split: str) -> Split:
    """One split; slicing ('train[:10%]') allowed."""

  @abc.abstractmethod
  def info(self) -> DatasetInfo:
    """Classes, split sizes and image shape."""


_SOURCES: dict[str, type[DataSource]] = {}
TFDS_KIND = "tfds"  # the kind of bare names


def register(kind: str) -> Callable[[type[DataSource]], type[DataSource]]:
  """Class decorator: `config.input.dataset='kind:arg'` opens `cls(arg, config.input)`."""

  def add(cls):
    if kind in _SOURCES:
      raise ValueError(f"data source {kind!r} registered twice ({_SOURCES[kind]}, {cls})")
    cls.kind = kind
    _SOURCES[kind] = cls
    return cls

  return add


def accepted_forms() -> str:
  """How `config.input.dataset` may be written (for error messages)."""
  kinds = sorted(_SOURCES, key=lambda kind: kind != TFDS_KIND)  # TFDS names first.
  forms = [_SOURCES[kind].form for kind in kinds if _SOURCES[kind].form]
  return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else "".join(forms)


# TFDS names: name[/config][:version], e.g. 'voc/2012', 'imagenet2012:5.1.0'.
_TFDS_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(/[\w.\-]+)?(:[\d.*]+)?$")


def parse(spec) -> tuple[str, str]:
  """(kind, argument) of a dataset spec: 'npz:/f.npz' -> ('npz', '/f.npz').

  A path argument may start with '~' (the shell leaves '~' after 'kind:' unexpanded).
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"config.input.dataset must be {accepted_forms()}, got {spec!r}")
  kind, sep, arg = spec.partition(":")
  if sep and kind in _SOURCES and kind != TFDS_KIND:
    return kind, os.path.expanduser(arg)
  if _TFDS_NAME_RE.match(spec):
    return TFDS_KIND, spec
  raise ValueError(f"unknown dataset {spec!r}: set config.input.dataset to {accepted_forms()}")


_LOGGED = set()


def get(input_config) -> DataSource:
  """The source of `input_config.dataset` (`input_config` is `config.input`)."""
  kind, arg = parse(input_config.dataset)
  source = _SOURCES[kind].create(arg, input_config)
  key = (source.dataset, source.kind, source.arg)
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.info("dataset %r read from %s source %s", source.dataset, source.kind, source.arg)
  return source


def check(input_config) -> Optional[str]:
  """What is wrong with `config.input.dataset` (None when nothing), without reading data.

  Returns a message that says how to fix it: an unknown form, a TFDS name TFDS does not
  know (with the closest name), a missing file or directory.
  """
  try:
    kind, arg = parse(input_config.get("dataset"))
  except ValueError as e:
    return str(e)
  return _SOURCES[kind].check(arg, input_config)


# ----------------------------------------------------------------------------------------------
# Split names ('train', 'train[:10%]', 'test[5:20]').

_SLICE_RE = re.compile(r"^(?P<name>[\w\-]+)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


def parse_split(split: str) -> tuple[str, str, str]:
  """(base name, start, stop) of 'name[start:stop]' ('' when absent)."""
  m = _SLICE_RE.match(split.strip())
  if m is None:
    raise ValueError(
        f"cannot parse split {split!r}: use 'name' or 'name[start:stop]' with "
        "integer or percent bounds, e.g. 'train[:10%]'"
    )
  return m.group("name"), m.group("start") or "", m.group("stop") or ""


def _slice_bound(bound: str, n: int, default: int) -> int:
  if not bound:
    return default
  if bound.endswith("%"):
    value = int(round(int(bound[:-1]) * n / 100))  # TFDS rounds to the closest integer.
  else:
    value = int(bound)
  if value < 0:
    value += n
  return min(max(value, 0), n)


def slice_indices(split: str, n: int) -> np.ndarray:
  """Indices [k] of the examples that `split` selects out of a base split of n."""
  _, start, stop = parse_split(split)
  return np.arange(_slice_bound(start, n, 0), _slice_bound(stop, n, n))


def missing_split_error(dataset: str, split: str, available, how: str) -> ValueError:
  """The error for a split `dataset` lacks: what it has, and `how` to get more."""
  return ValueError(
      f"dataset {dataset!r} has no split {split!r}; available splits: {sorted(available)}. {how}"
  )
