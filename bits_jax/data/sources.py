"""Dataset sources: TFDS names, IDX directories, .npz files and image folders.

`config.dataset` accepts
  * a TFDS name (`cifar10`, `imagenet2012`, ...), prepared in `config.data_dir`
    (downloaded and prepared on first use when it is not);
  * `fashion_mnist`: TFDS when already prepared, else the IDX files found in
    `config.idx_dir` (Debian package `dataset-fashion-mnist`);
  * `idx:/dir`: an explicit directory with `train-images-idx3-ubyte[.gz]`,
    `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, ...;
  * `npz:/path/file.npz`: arrays `images` [N, H, W(, C)] uint8, `labels` [N]
    and optionally `test_images` / `test_labels`. Without the test arrays the
    last 10% of the examples (in file order) form split 'test' and the first
    90% form split 'train';
  * `imagefolder:/dir`: `/dir/<class>/<image>.{png,jpg,jpeg}` (labels are the
    indices of the sorted class names); optional `/dir/train`, `/dir/test`, ...
    sub-directories hold one split each, otherwise the whole folder is split
    90/10 into 'train'/'test' like npz files.

A split is one of three kinds, which the pipeline treats differently:
  * `ArraySplit`: decoded images in memory, random access (IDX, npz);
  * `FileSplit`: encoded image files, random access (imagefolder);
  * `TfdsSplit`: TFDS records, streamed (not random access).
Split names accept TFDS slicing, e.g. 'train[:10%]', 'test[100:200]'.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import re
from typing import Optional, Union

import numpy as np

_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_HELD_OUT_FRACTION = 0.1
_ACCEPTED_FORMS = ("a TFDS name (e.g. 'cifar10', 'imagenet2012'), 'fashion_mnist', "
                   "'idx:/dir', 'npz:/path/file.npz' or 'imagefolder:/dir'")

# Per-dataset normalization statistics (on images scaled to [0, 1]).
KNOWN_NORMALIZATION = {
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'imagenet2012_subset': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'mnist': ((0.1307,), (0.3081,)),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and evaluation need to know about a dataset."""
  name: str
  num_classes: int
  num_examples: dict  # split name -> number of examples.
  image_shape: tuple  # (H, W, C); H and W are None for variable-size images.
  source: str  # 'tfds', 'idx', 'npz' or 'imagefolder'.


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """Decoded images held in memory. images: [n, h, w, c] uint8, labels: [n]."""
  images: np.ndarray
  labels: np.ndarray
  name: str

  @property
  def num_examples(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class FileSplit:
  """Encoded image files. paths: [n] str, labels: [n] int64."""
  paths: np.ndarray
  labels: np.ndarray
  channels: int
  name: str
  skipped: tuple = ()  # Undecodable files left out (skip_corrupt_images=True).

  @property
  def num_examples(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """A split of a prepared TFDS builder, read as a stream of records."""
  builder: object
  split: str
  num_examples: int
  channels: int
  name: str


Split = Union[ArraySplit, FileSplit, TfdsSplit]


# ----------------------------------------------------------------------------
# Split-name parsing ('train', 'train[:10%]', 'test[5:20]').

_SLICE_RE = re.compile(r'^(?P<name>[\w\-]+)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$')


def parse_split(split: str) -> tuple[str, str, str]:
  """Returns (base name, start, stop) of 'name[start:stop]' ('' when absent)."""
  m = _SLICE_RE.match(split.strip())
  if m is None:
    raise ValueError(f"cannot parse split {split!r}: use 'name' or 'name[start:stop]' "
                     "with integer or percent bounds, e.g. 'train[:10%]'")
  return m.group('name'), m.group('start') or '', m.group('stop') or ''


def _slice_bound(bound: str, n: int, default: int) -> int:
  if not bound:
    return default
  if bound.endswith('%'):
    # TFDS rounds percent boundaries to the closest integer.
    value = int(round(int(bound[:-1]) * n / 100))
  else:
    value = int(bound)
  if value < 0:
    value += n
  return min(max(value, 0), n)


def slice_indices(split: str, n: int) -> np.ndarray:
  """Indices of the examples that `split` selects out of a base split of n."""
  _, start, stop = parse_split(split)
  return np.arange(_slice_bound(start, n, 0), _slice_bound(stop, n, n))


def _missing_split_error(dataset: str, split: str, available, how: str) -> ValueError:
  return ValueError(f'dataset {dataset!r} has no split {split!r}; available splits: '
                    f'{sorted(available)}. {how}')


# ----------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST distribution format).

_IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def _idx_path(directory: str, stem: str) -> Optional[str]:
  for candidate in (stem + '.gz', stem):
    path = os.path.join(directory, candidate)
    if os.path.exists(path):
      return path
  return None


def idx_available(directory: Optional[str]) -> bool:
  """Whether `directory` holds the IDX train files."""
  return bool(directory) and all(
      _idx_path(directory, stem) for stem in _IDX_FILES['train'])


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzip-compressed) into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path} is not an IDX file (bad magic number)')
  dtype_code, ndim = data[2], data[3]
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4',
            0x0E: '>f8'}
  if dtype_code not in dtypes:
    raise ValueError(f'{path}: unknown IDX element type 0x{dtype_code:02x}')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: expected {int(np.prod(shape))} values for shape {shape}, '
                     f'found {array.size} (truncated file?)')
  return array.reshape(shape)


def _read_idx_split(directory: str, base: str) -> tuple[np.ndarray, np.ndarray]:
  if base not in _IDX_FILES:
    raise _missing_split_error(f'idx:{directory}', base, _IDX_FILES,
                               'IDX directories hold train-* and t10k-* (test) files.')
  paths = [_idx_path(directory, stem) for stem in _IDX_FILES[base]]
  if not all(paths):
    raise FileNotFoundError(f'IDX files {_IDX_FILES[base]} (optionally .gz) not found in '
                            f'{directory}; on Debian install dataset-fashion-mnist or '
                            'point idx_dir at a copy of them')
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim == 3:
    images = images[..., None]
  return images.astype(np.uint8), labels.astype(np.int64)


# ----------------------------------------------------------------------------
# npz files.


def _load_npz(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f'npz file {path} does not exist; dataset should be '
                            "'npz:/path/file.npz' with arrays 'images' and 'labels'")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  for key in ('images', 'labels'):
    if key not in arrays:
      raise ValueError(f"{path} has arrays {sorted(arrays)} but needs 'images' "
                       "[N, H, W(, C)] uint8 and 'labels' [N] int")
  return arrays


def _check_images(images: np.ndarray, labels: np.ndarray, where: str):
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'{where}: images must be [N, H, W] or [N, H, W, C] with C in (1, 3), '
                     f'got shape {images.shape}')
  if images.dtype != np.uint8:
    raise ValueError(f'{where}: images must be uint8 in [0, 255], got {images.dtype}')
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f'{where}: labels must be [N] with N={len(images)}, got shape '
                     f'{labels.shape}')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{where}: labels must be integers, got {labels.dtype}')
  return images, labels.astype(np.int64)


def _held_out_bounds(n: int) -> int:
  """Number of leading examples that form 'train' when 'test' is held out."""
  return n - max(1, int(round(n * _HELD_OUT_FRACTION))) if n > 1 else n


def _npz_split(path: str, base: str) -> tuple[np.ndarray, np.ndarray]:
  arrays = _load_npz(path)
  images, labels = _check_images(arrays['images'], arrays['labels'], path)
  has_test = 'test_images' in arrays
  if has_test:
    test = _check_images(arrays['test_images'], arrays['test_labels'], path + ' (test)')
  if base == 'train':
    return (images, labels) if has_test else (
        images[:_held_out_bounds(len(labels))], labels[:_held_out_bounds(len(labels))])
  if base == 'test':
    return test if has_test else (
        images[_held_out_bounds(len(labels)):], labels[_held_out_bounds(len(labels)):])
  raise _missing_split_error(f'npz:{path}', base, ['train', 'test'],
                             "npz files provide 'train' and 'test' (held-out 10% of "
                             "'images' unless 'test_images' is present).")


def _npz_num_classes(path: str) -> int:
  arrays = _load_npz(path)
  labels = [arrays['labels']] + ([arrays['test_labels']] if 'test_labels' in arrays else [])
  return int(max(int(l.max()) for l in labels if len(l)) + 1)


# ----------------------------------------------------------------------------
# Image folders.


def _list_classes(directory: str) -> list[str]:
  return sorted(d for d in os.listdir(directory)
                if os.path.isdir(os.path.join(directory, d)) and not d.startswith('.'))


def _imagefolder_layout(root: str) -> dict:
  """Maps split name -> directory of class folders."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist; dataset should be "
                            "'imagefolder:/dir' with one sub-folder of images per class")
  split_dirs = {s: os.path.join(root, s) for s in ('train', 'test', 'val', 'validation')
                if os.path.isdir(os.path.join(root, s))}
  if 'train' in split_dirs:
    return split_dirs
  return {'': root}


def _imagefolder_files(directory: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(directory, name)
    if not os.path.isdir(class_dir):
      continue
    for fname in sorted(os.listdir(class_dir)):
      if fname.lower().endswith(_IMAGE_EXTENSIONS):
        paths.append(os.path.join(class_dir, fname))
        labels.append(label)
  return np.array(paths, dtype=object), np.array(labels, dtype=np.int64)


def _imagefolder_classes(root: str) -> list[str]:
  layout = _imagefolder_layout(root)
  classes = _list_classes(layout.get('train', layout.get('')))
  if not classes:
    raise ValueError(f'image folder {root} has no class sub-folders; expected '
                     '<root>/<class>/<image>.png|jpg')
  return classes


def _imagefolder_split(root: str, base: str) -> tuple[np.ndarray, np.ndarray]:
  layout = _imagefolder_layout(root)
  classes = _imagefolder_classes(root)
  if '' in layout:
    paths, labels = _imagefolder_files(root, classes)
    if not len(paths):
      raise ValueError(f'image folder {root} has no {"/".join(_IMAGE_EXTENSIONS)} files')
    # Deterministic, class-balanced-in-expectation held-out split: every
    # 10th file of the sorted listing goes to 'test'.
    held_out = np.arange(len(paths)) % int(round(1 / _HELD_OUT_FRACTION)) == 0
    if base == 'train':
      return paths[~held_out], labels[~held_out]
    if base == 'test':
      return paths[held_out], labels[held_out]
    raise _missing_split_error(f'imagefolder:{root}', base, ['train', 'test'],
                               'Flat image folders are split into train (90%) and test '
                               '(every 10th file); use <root>/<split>/<class>/ for more.')
  if base not in layout:
    raise _missing_split_error(f'imagefolder:{root}', base, layout,
                               'Create <root>/<split>/<class>/ folders for it.')
  return _imagefolder_files(layout[base], classes)


def _imagefolder_channels(paths: np.ndarray) -> int:
  """Channels of the dataset: 1 when the first image is grayscale, else 3."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not len(paths):
    return 3
  try:
    with Image.open(paths[0]) as im:
      return 1 if im.mode in ('L', 'I', 'I;16', '1') else 3
  except Exception:  # pylint: disable=broad-except
    return 3


def find_corrupt_files(paths, channels: int) -> np.ndarray:
  """Boolean mask [n] of files that fail to decode (decodes all files)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths = np.asarray(paths, dtype=str)
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))

  def decode(i, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)
    return i, tf.shape(image)[0]

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  ok = np.zeros(len(paths), dtype=bool)
  for i, _ in ds.as_numpy_iterator():
    ok[i] = True
  return ~ok


def check_image_file(path: str, channels: int) -> Optional[str]:
  """Returns the decode error of one image file, or None when it decodes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
  except (tf.errors.OpError, ValueError) as e:
    return getattr(e, 'message', str(e)).strip().splitlines()[0]
  return None


# ----------------------------------------------------------------------------
# TFDS.


def _tfds_builder(name: str, data_dir: Optional[str], prepare: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError and friends.
    reason = str(e).strip().splitlines()[0]  # TFDS appends every dataset name.
    raise ValueError(f'unknown dataset {name!r}: use {_ACCEPTED_FORMS} ({reason})') from e
  if prepare and not _tfds_is_prepared(builder):
    logging.info('TFDS dataset %s is not prepared in %s: downloading and preparing it.',
                 name, builder.data_dir)
    builder.download_and_prepare()
  return builder


def _tfds_is_prepared(builder) -> bool:
  try:
    return bool(builder.is_prepared())
  except Exception:  # pylint: disable=broad-except
    return os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


def _tfds_prepared_without_download(name: str, data_dir: Optional[str]) -> bool:
  """Whether TFDS `name` is already prepared (never touches the network)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return _tfds_is_prepared(tfds.builder(name, data_dir=data_dir))
  except Exception:  # pylint: disable=broad-except
    return False


def _tfds_split(builder, split: str, name: str) -> TfdsSplit:
  base, _, _ = parse_split(split)
  if base not in builder.info.splits:
    raise _missing_split_error(name, base, builder.info.splits.keys(),
                               f'Run tfds.builder({name!r}).download_and_prepare() or pick '
                               'one of the available splits.')
  image = builder.info.features['image']
  return TfdsSplit(builder=builder, split=split,
                   num_examples=int(builder.info.splits[split].num_examples),
                   channels=int(image.shape[-1] or 3), name=name)


# ----------------------------------------------------------------------------
# Dispatch.


def source_kind(config) -> tuple[str, str]:
  """Returns (kind, argument) of `config.dataset`: kind in tfds/idx/npz/imagefolder."""
  dataset = config.get('dataset', None)
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f'config.dataset must be {_ACCEPTED_FORMS}, got {dataset!r}')
  for prefix in ('idx', 'npz', 'imagefolder'):
    if dataset.startswith(prefix + ':'):
      return prefix, dataset[len(prefix) + 1:]
  if ':' in dataset or '/' in dataset:
    raise ValueError(f'unknown dataset {dataset!r}: use {_ACCEPTED_FORMS}')
  if dataset == 'fashion_mnist':
    data_dir = config.get('data_dir', None)
    idx_dir = config.get('idx_dir', None)
    if not _tfds_prepared_without_download(dataset, data_dir) and idx_available(idx_dir):
      return 'idx', idx_dir
  return 'tfds', dataset


_LOGGED_SOURCES = set()


def _log_source(config, kind: str, arg: str):
  key = (config.dataset, kind, arg)
  if key not in _LOGGED_SOURCES:
    _LOGGED_SOURCES.add(key)
    logging.info('dataset %r read from %s source %s', config.dataset, kind, arg)


def open_split(config, split: str) -> Split:
  """Opens one split (slicing allowed) of `config.dataset`."""
  kind, arg = source_kind(config)
  _log_source(config, kind, arg)
  base, _, _ = parse_split(split)
  if kind == 'tfds':
    builder = _tfds_builder(arg, config.get('data_dir', None), prepare=True)
    return _tfds_split(builder, split, arg)
  if kind == 'idx':
    images, labels = _read_idx_split(arg, base)
  elif kind == 'npz':
    images, labels = _npz_split(arg, base)
  else:
    paths, labels = _imagefolder_split(arg, base)
    index = slice_indices(split, len(labels))
    paths, labels = paths[index], labels[index]
    channels = _imagefolder_channels(paths)
    if config.get('skip_corrupt_images', False) and len(paths):
      corrupt = find_corrupt_files(paths, channels)
      if corrupt.any():
        logging.warning('skipping %d corrupt image(s) of %d in %s split %s, e.g. %s',
                        corrupt.sum(), len(paths), arg, split, paths[corrupt][0])
      skipped = tuple(str(p) for p in paths[corrupt])
      paths, labels = paths[~corrupt], labels[~corrupt]
    else:
      skipped = ()
    return FileSplit(paths=paths.astype(str), labels=labels, channels=channels,
                     name=config.dataset, skipped=skipped)
  index = slice_indices(split, len(labels))
  return ArraySplit(images=images[index], labels=labels[index], name=config.dataset)


def count_corrupt_images(config, split: str) -> int:
  """Number of imagefolder files of `split` that fail to decode."""
  kind, arg = source_kind(config)
  if kind != 'imagefolder':
    raise ValueError(f'count_corrupt_images needs an imagefolder dataset, got {config.dataset!r}')
  paths, labels = _imagefolder_split(arg, parse_split(split)[0])
  index = slice_indices(split, len(labels))
  return int(find_corrupt_files(paths[index], _imagefolder_channels(paths[index])).sum())


def get_dataset_info(config) -> DatasetInfo:
  """Classes, split sizes and image shape of `config.dataset`."""
  kind, arg = source_kind(config)
  _log_source(config, kind, arg)
  if kind == 'tfds':
    builder = _tfds_builder(arg, config.get('data_dir', None), prepare=True)
    label = builder.info.features['label']
    image = builder.info.features['image']
    return DatasetInfo(
        name=arg, num_classes=int(label.num_classes),
        num_examples={k: int(v.num_examples) for k, v in builder.info.splits.items()},
        image_shape=tuple(image.shape), source='tfds')
  if kind in ('idx', 'npz'):
    splits = {s: open_split(config, s) for s in ('train', 'test')
              if kind == 'npz' or _idx_path(arg, _IDX_FILES[s][0])}
    shape = tuple(splits['train'].images.shape[1:])
    if kind == 'npz':
      num_classes = _npz_num_classes(arg)
    else:
      num_classes = int(max(s.labels.max() for s in splits.values() if s.num_examples) + 1)
    return DatasetInfo(name=config.dataset, num_classes=num_classes,
                       num_examples={k: v.num_examples for k, v in splits.items()},
                       image_shape=shape, source=kind)
  classes = _imagefolder_classes(arg)
  layout = _imagefolder_layout(arg)
  split_names = ['train', 'test'] if '' in layout else sorted(layout)
  num_examples = {s: len(_imagefolder_split(arg, s)[1]) for s in split_names}
  channels = _imagefolder_channels(_imagefolder_split(arg, split_names[0])[0])
  return DatasetInfo(name=config.dataset, num_classes=len(classes), num_examples=num_examples,
                     image_shape=(None, None, channels), source='imagefolder')
