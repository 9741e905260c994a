"""TFDS names (`cifar10`, `imagenet2012`, `voc/2012`, `coco/2014`, ...), read as record streams.

A dataset not yet prepared in `config.input.data_dir` is downloaded and prepared on first use.
`fashion_mnist` falls back to the IDX files in `config.input.idx_dir` when TFDS has not
prepared it (offline machines with the Debian package `dataset-fashion-mnist`).

Labels: a `label` ClassLabel feature gives int32 class labels. Without one, a Sequence of
ClassLabel (`labels`, as in `voc`) or of objects with a ClassLabel (`objects/label`, as in
`coco`) gives multi-hot labels, bool [num_classes] (`DatasetInfo.multi_label=True`). Ids come
from the first of the features `file_name`, `image/filename`, `image/id`, `id`, else from
TFDS's record id (`tfds_id`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from typing import Optional

import tensorflow as tf
from etils import epath

from bits_jax.data.sources import core
from bits_jax.data.sources import idx

_ID_FEATURES = ("file_name", "image/filename", "image/id", "id")
_OFFLINE_FALLBACKS = ("fashion_mnist",)  # TFDS names with an IDX copy in config.input.idx_dir


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _is_prepared(builder) -> bool:
  try:
    return bool(builder.is_prepared())
  except Exception:  # pylint: disable=broad-except  # Older TFDS: no is_prepared().
    return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _prepare_once(builder, name: str) -> None:
  """Downloads and prepares `builder` on process 0 while the others wait (a shared
  data_dir, e.g. gs://, is prepared once); a process whose data_dir is its own disk and still
  lacks the data prepares it after that. Collective: every process calls it."""
  import jax  # pylint: disable=g-import-not-at-top

  from bits_jax import utils  # pylint: disable=g-import-not-at-top

  def prepare():
    logging.info(
        "TFDS dataset %s is not prepared in %s: downloading and preparing it.",
        name,
        builder.data_dir,
    )
    builder.download_and_prepare()

  if jax.process_index() == 0 and not _is_prepared(builder):
    prepare()
  utils.sync_processes(f"bits_jax_tfds_prepare_{name}")
  if jax.process_index() != 0 and not _is_prepared(builder):
    prepare()


def _prepared_without_download(name: str, data_dir: Optional[str]) -> bool:
  """Whether TFDS `name` is already prepared (never touches the network)."""
  try:
    # Building a builder for a dataset with no folder logs a TFDS warning per lookup.
    root = epath.Path(data_dir or _tfds().core.constants.DATA_DIR)
    if not (root / name.split(":")[0].split("/")[0]).exists():
      return False
    return _is_prepared(_tfds().builder(name, data_dir=data_dir))
  except Exception:  # pylint: disable=broad-except
    return False


def _feature(features, path: tuple):
  """The feature at `path` (keys through dicts and Sequences), or None."""
  tfds = _tfds()
  for key in path:
    if isinstance(features, tfds.features.Sequence):
      features = features.feature
    if not isinstance(features, tfds.features.FeaturesDict) or key not in features:
      return None
    features = features[key]
  return features


def _label_spec(features, name: str) -> tuple[tuple, int, bool]:
  """(feature path, num_classes, multi_label) of the labels of a TFDS dataset."""
  tfds = _tfds()
  for path, multi_label in ((("label",), False), (("labels",), True), (("objects", "label"), True)):
    feature = _feature(features, path)
    if multi_label and isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    elif multi_label and len(path) == 1:
      continue  # 'labels' must be a Sequence of ClassLabel.
    if isinstance(feature, tfds.features.ClassLabel):
      return path, int(feature.num_classes), multi_label
  raise ValueError(
      f"TFDS dataset {name!r} has features {list(features.keys())}; the pipeline "
      "needs 'image' and a ClassLabel 'label' (or a Sequence of ClassLabel "
      "'labels' or 'objects/label' for multi-label data)"
  )


class TfdsSplit(core.Split):  # pylint: disable=abstract-method  # Streamed: no lookup().
  """A split of a prepared TFDS builder, read as a stream of records."""

  encoded = True
  random_access = False

  def __init__(self, builder, split: str, name: str):
    features = builder.info.features
    if "image" not in features:
      raise ValueError(
          f"TFDS dataset {name!r} has features {list(features.keys())}; the pipeline needs 'image'"
      )
    self.builder, self.name, self.dataset = builder, split, name
    self.num_examples = int(builder.info.splits[split].num_examples)
    self.channels = int(features["image"].shape[-1] or 3)
    self.label_path, self.num_classes, self.multi_label = _label_spec(features, name)
    self.id_feature = next((f for f in _ID_FEATURES if f in features), None)

  def _record(self, record: dict, with_ids: bool) -> dict:
    label = record
    for key in self.label_path:
      label = label[key]
    if self.multi_label:
      label = tf.reduce_sum(tf.one_hot(label, self.num_classes), axis=0) > 0
    else:
      label = tf.cast(label, tf.int32)
    out = {"image": record["image"], "label": label}
    if with_ids:
      ident = record[self.id_feature or "tfds_id"]
      out["id"] = ident if ident.dtype == tf.string else tf.strings.as_string(ident)
    return out

  def _shard(self, process_index, process_count) -> str:
    return _tfds().split_for_jax_process(
        self.name, process_index=process_index, process_count=process_count
    )

  def shard_size(self, process_index, process_count):
    return int(self.builder.info.splits[self._shard(process_index, process_count)].num_examples)

  def stream(self, process_index, process_count, *, shuffle_seed, options, with_ids=False):
    tfds = _tfds()
    shard = self._shard(process_index, process_count)
    shuffle = shuffle_seed is not None
    read_config = tfds.ReadConfig(
        options=options,
        shuffle_seed=shuffle_seed,
        shuffle_reshuffle_each_iteration=False if shuffle else None,
        interleave_cycle_length=16 if shuffle else 1,
        add_tfds_id=with_ids and self.id_feature is None,
    )
    records = self.builder.as_dataset(
        split=shard,
        shuffle_files=shuffle,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    record_fn = functools.partial(self._record, with_ids=with_ids)
    return records.map(
        tf.autograph.experimental.do_not_convert(record_fn),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


@core.register(core.TFDS_KIND)
class TfdsSource(core.DataSource):
  """A TFDS builder, prepared in config.input.data_dir on first use."""

  form = "a TFDS name (e.g. 'cifar10', 'voc/2012'), 'fashion_mnist'"

  def __init__(self, arg, input_config):
    super().__init__(arg, input_config)
    self.data_dir = input_config.data_dir
    self._builder = None

  @classmethod
  def create(cls, arg, input_config):
    idx_dir = os.path.expanduser(input_config.idx_dir) if input_config.idx_dir else None
    if (
        arg in _OFFLINE_FALLBACKS
        and not _prepared_without_download(arg, input_config.data_dir)
        and idx.available(idx_dir)
    ):
      return idx.IdxSource(idx_dir, input_config)
    return cls(arg, input_config)

  @classmethod
  def check(cls, arg, input_config):
    tfds = _tfds()
    base = arg.split(":")[0].split("/")[0]
    try:
      tfds.builder_cls(base)
    except Exception:  # pylint: disable=broad-except  # DatasetNotFoundError and friends.
      close = difflib.get_close_matches(base, tfds.list_builders(), n=1, cutoff=0.75)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      return f"unknown dataset {arg!r}{hint}: set config.input.dataset to {core.accepted_forms()}."
    return None

  def builder(self):
    """The TFDS builder, downloaded and prepared when it is not yet."""
    if self._builder is None:
      try:
        builder = _tfds().builder(self.arg, data_dir=self.data_dir)
      except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError and friends.
        reason = str(e).strip().splitlines()[0]  # TFDS appends every dataset name.
        raise ValueError(
            f"unknown dataset {self.arg!r}: use {core.accepted_forms()} ({reason})"
        ) from e
      _prepare_once(builder, self.arg)
      self._builder = builder
    return self._builder

  def open(self, split: str) -> TfdsSplit:
    builder = self.builder()
    base, _, _ = core.parse_split(split)
    if base not in builder.info.splits:
      raise core.missing_split_error(
          self.arg,
          base,
          builder.info.splits.keys(),
          f"Run tfds.builder({self.arg!r}).download_and_prepare() "
          "or pick one of the available splits.",
      )
    return TfdsSplit(builder, split, self.arg)

  def info(self) -> core.DatasetInfo:
    builder = self.builder()
    _, num_classes, multi_label = _label_spec(builder.info.features, self.arg)
    return core.DatasetInfo(
        name=self.arg,
        num_classes=num_classes,
        num_examples={k: int(v.num_examples) for k, v in builder.info.splits.items()},
        image_shape=tuple(builder.info.features["image"].shape),
        source=self.kind,
        multi_label=multi_label,
    )
