"""Deterministic multi-crop train iterator and padded eval iterator.

Train stream (per process p of P, local batch b = batch_size // P, global
batch B = batch_size):
  * Random-access sources (npz, IDX, imagefolder): local element l of process
    p is global stream position g = (l // b) * B + p * b + l % b, i.e. global
    batch k is split into P contiguous slices. Position g reads example
    index_shuffle(g mod N, seed(epoch = g // N)) and augments it with seed
    fold(seed, g). Batch k is therefore index arithmetic on (seed, p, k):
    resuming at start_step=k starts the counter at k * b, costing nothing.
  * TFDS sources (streamed records): process p reads its even slice of the
    split (`tfds.split_for_jax_process`); epoch e of that slice is a
    file-shuffled (seeded) and buffer-shuffled (seeded) record stream with
    seeds derived from (seed, p, e), re-created for each epoch. Local element
    l = e * n_p + i is augmented with seed fold(seed, p, l). Resuming at step
    k rebuilds epoch e = k * b // n_p and skips k * b mod n_p records before
    decoding, i.e. at most one epoch of record reads (no image decoding).
    Each epoch builds one new tf.data iterator (a few seconds on a busy
    2-core machine), negligible next to real epochs.

Eval stream: the split is cut into P contiguous, even shards; every process
yields ceil(ceil(N / P) / b) batches, padding the tail with mask=False.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf

from bits_jax.data import augment
from bits_jax.data import sources


def default_data_config() -> ml_collections.ConfigDict:
  """Every data key with its default; train configs override what they need."""
  return ml_collections.ConfigDict(dict(
      dataset='fashion_mnist',
      data_dir=None,
      idx_dir='/usr/share/datasets/fashion-mnist',
      train_split='train',
      test_split='test',
      bank_split='train',
      seed=0,
      batch_size=256,
      eval_batch_size=256,
      num_global_crops=2,
      num_local_crops=0,
      global_crop_size=28,
      local_crop_size=12,
      global_crop_scale=(0.32, 1.0),
      local_crop_scale=(0.05, 0.32),
      flip=True,
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_probs=(1.0, 0.1, 0.5),
      solarize_prob=0.2,
      normalize_mean=None,
      normalize_std=None,
      eval_resize_size=None,
      eval_crop_size=None,
      shuffle_buffer=10_000,
      # Extra knobs (not required by configs).
      skip_corrupt_images=False,  # imagefolder: skip undecodable files (counted, logged).
      resize_method='bicubic',  # tf.image.resize method of every crop.
      # Antialiased downscaling (as PIL) costs ~2x the resize time; TF SSL
      # pipelines (SimCLR, big_vision) resize without it.
      resize_antialias=False,
      data_xla=True,  # XLA-compile hue/grayscale/normalize (2-3x faster on CPU).
      data_threads=None,  # tf.data private thread-pool size; None: TF default.
      prefetch_batches=2,  # host-side batches prepared ahead.
  ))


def resolve_config(config) -> ml_collections.ConfigDict:
  """Defaults overridden by the data keys present in `config`."""
  resolved = default_data_config()
  for key in resolved.keys():
    if key in config:
      value = config[key]
      with resolved.ignore_type():
        resolved[key] = tuple(value) if isinstance(value, list) else value
  if not resolved.dataset:
    raise ValueError('config.dataset is required')
  for key in ('global_crop_size', 'local_crop_size'):
    if int(resolved[key]) <= 0:
      raise ValueError(f'config.{key} must be a positive int, got {resolved[key]}')
  if len(tuple(resolved.blur_probs)) != 3:
    raise ValueError('config.blur_probs must be (first global, other globals, locals), '
                     f'got {resolved.blur_probs}')
  return resolved


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
  return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int, name: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'config.{name}={global_batch} must be a positive multiple of the '
                     f'process count {process_count}; change {name} to a multiple of it')
  return global_batch // process_count


def color_spec(cfg, channels: int) -> augment.ColorSpec:
  """Photometric settings with normalization resolved for this dataset."""
  mean, std = cfg.normalize_mean, cfg.normalize_std
  known = sources.KNOWN_NORMALIZATION.get(cfg.dataset)
  if mean is None:
    mean = known[0] if known and len(known[0]) == channels else (0.5,) * channels
  if std is None:
    std = known[1] if known and len(known[1]) == channels else (0.5,) * channels
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  for name, value in (('normalize_mean', mean), ('normalize_std', std)):
    if len(value) not in (1, channels):
      raise ValueError(f'config.{name}={value} must have 1 or {channels} entries for '
                       f'{channels}-channel images')
  if min(std) <= 0:
    raise ValueError(f'config.normalize_std={std} must be positive')
  return augment.ColorSpec(
      channels=channels, flip=bool(cfg.flip), color_jitter_prob=float(cfg.color_jitter_prob),
      brightness=float(cfg.brightness), contrast=float(cfg.contrast),
      saturation=float(cfg.saturation), hue=float(cfg.hue),
      grayscale_prob=float(cfg.grayscale_prob), mean=mean, std=std,
      resize_method=str(cfg.resize_method), resize_antialias=bool(cfg.resize_antialias),
      xla=bool(cfg.data_xla))


def _channels(split) -> int:
  if isinstance(split, sources.ArraySplit):
    return int(split.images.shape[-1])
  return int(split.channels)


def _seed_int(*parts) -> int:
  """A 31-bit int seed derived from integers (for APIs that take Python seeds)."""
  digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
  return int.from_bytes(digest[:4], 'little') & 0x7FFFFFFF


def _base_seed(seed: int, salt: int) -> tf.Tensor:
  return augment.fold_seed(tf.constant([int(seed), 0x5EED], tf.int64), salt)


_PERMUTATION_SALT, _AUGMENT_SALT = 1, 2


# Map functions are plain TF graph code: AutoGraph conversion of the Python
# loops over views would only add seconds of tracing.
_no_autograph = tf.autograph.experimental.do_not_convert


def _options(cfg) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if cfg.data_threads:
    options.threading.private_threadpool_size = int(cfg.data_threads)
  return options


def _hide_accelerators_from_tf():
  """TF only feeds the host; keep it off GPUs/TPUs that JAX owns."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialized; nothing to do then.
    pass


# ----------------------------------------------------------------------------
# Element lookup for random-access splits.


def _lookup_fn(split):
  """(index -> (image, label)) and whether `image` holds encoded bytes."""
  labels = tf.constant(split.labels, tf.int64)
  if isinstance(split, sources.ArraySplit):
    images = tf.constant(split.images)
    return (lambda i: (tf.gather(images, i), tf.gather(labels, i))), False
  paths = tf.constant(split.paths.astype(str))
  return (lambda i: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i))), True


def train_positions(step: int, process_index: int, process_count: int,
                    local_batch: int) -> np.ndarray:
  """Global stream positions [b] of process `process_index`'s batch `step`."""
  return (step * local_batch * process_count + process_index * local_batch
          + np.arange(local_batch))


def example_index(position, num_examples: int, seed: int) -> tf.Tensor:
  """Example read at global stream position(s): one permutation per epoch."""
  position = tf.cast(position, tf.int64)
  epoch, offset = position // num_examples, position % num_examples
  perm_seed = augment.fold_seed(_base_seed(seed, _PERMUTATION_SALT), epoch)
  if num_examples == 1:
    return tf.zeros_like(offset)
  return tf.random.experimental.index_shuffle(offset, perm_seed,
                                              tf.constant(num_examples - 1, tf.int64))


def example_indices(positions, num_examples: int, seed: int) -> np.ndarray:
  """Examples [n] read at global stream positions [n] (numpy)."""
  return np.array([int(example_index(p, num_examples, seed)) for p in positions])


def _views_to_features(groups, label) -> dict:
  """multicrop's [global views, local views (optional)] -> feature dict."""
  features = {'global': groups[0], 'label': tf.cast(label, tf.int32)}
  if len(groups) > 1:
    features['local'] = groups[1]
  return features


def _random_access_train_dataset(split, cfg, spec, groups, *, start_step,
                                 process_index, process_count, local_batch):
  n = split.num_examples
  global_batch = local_batch * process_count
  lookup, encoded = _lookup_fn(split)
  aug_seed = _base_seed(cfg.seed, _AUGMENT_SALT)

  @_no_autograph
  def element(local_position):
    step, j = local_position // local_batch, local_position % local_batch
    position = step * global_batch + process_index * local_batch + j
    image, label = lookup(example_index(position, n, cfg.seed))
    out = augment.multicrop(image, augment.fold_seed(aug_seed, position), groups, spec,
                            encoded=encoded)
    return _views_to_features(out, label)

  ds = tf.data.Dataset.counter(start=start_step * local_batch, dtype=tf.int64)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(int(cfg.prefetch_batches))
  return ds.with_options(_options(cfg))


# ----------------------------------------------------------------------------
# TFDS (streamed) splits.


def _tfds_image_label(split: sources.TfdsSplit):
  features = split.builder.info.features
  for key in ('image', 'label'):
    if key not in features:
      raise ValueError(f"TFDS dataset {split.name!r} has features {list(features)}; the "
                       "pipeline needs 'image' and 'label'")


def _tfds_records(split: sources.TfdsSplit, shard: str, cfg, *, shuffle_seed):
  """Records {'image': encoded bytes, 'label'} of a TFDS shard."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shuffle = shuffle_seed is not None
  read_config = tfds.ReadConfig(
      options=_options(cfg), shuffle_seed=shuffle_seed,
      shuffle_reshuffle_each_iteration=False if shuffle else None,
      interleave_cycle_length=16 if shuffle else 1)
  return split.builder.as_dataset(
      split=shard, shuffle_files=shuffle, read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()})


def _tfds_train_batches(split: sources.TfdsSplit, cfg, spec, groups, *,
                        start_step, process_index, process_count,
                        local_batch) -> Iterator[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tfds_image_label(split)
  shard = tfds.split_for_jax_process(split.split, process_index=process_index,
                                     process_count=process_count)
  shard_size = int(split.builder.info.splits[shard].num_examples)
  if shard_size == 0:
    raise ValueError(f'process {process_index} got no examples of {split.name}:'
                     f'{split.split}; use fewer processes or a larger split')
  aug_seed = augment.fold_seed(_base_seed(cfg.seed, _AUGMENT_SALT), process_index)

  # Traced once and reused by every epoch's dataset.
  @functools.partial(tf.function, autograph=False)
  def element(local_position, record):
    out = augment.multicrop(record['image'], augment.fold_seed(aug_seed, local_position),
                            groups, spec, encoded=True)
    return _views_to_features(out, record['label'])

  def epoch_dataset(epoch: int, skip: int):
    seed = _seed_int(cfg.seed, process_index, epoch)
    ds = _tfds_records(split, shard, cfg, shuffle_seed=seed)
    ds = ds.shuffle(int(cfg.shuffle_buffer), seed=seed, reshuffle_each_iteration=False)
    ds = ds.enumerate(start=epoch * shard_size).skip(skip)
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.with_options(_options(cfg))

  epoch, skip = divmod(start_step * local_batch, shard_size)
  pending = None  # Examples of a batch begun in the previous epoch.
  while True:
    # Batches stay aligned to multiples of b across epochs: `offset` zero
    # placeholders stand in for the examples pending from the previous epoch,
    # so one dataset (one iterator to build) serves the whole epoch.
    offset = (epoch * shard_size + skip) % local_batch
    ds = epoch_dataset(epoch, skip)
    if offset:
      placeholder = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
      ds = tf.data.Dataset.from_tensors(placeholder).repeat(offset).concatenate(ds)
    ds = ds.batch(local_batch).prefetch(int(cfg.prefetch_batches))
    for i, batch in enumerate(ds.as_numpy_iterator()):
      if i == 0 and offset:
        batch = {k: np.concatenate([pending[k], v[offset:]]) for k, v in batch.items()}
      if len(batch['label']) == local_batch:
        yield batch
      else:
        pending = batch
    epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------
# Public iterators.


def _corrupt_file_error(split, indices) -> Optional[ValueError]:
  """Finds the undecodable file among the examples `indices`, if any."""
  for i in np.unique(indices):
    problem = sources.check_image_file(split.paths[i], split.channels)
    if problem:
      return ValueError(f'corrupt image {split.paths[i]}: {problem}. Remove or fix it, or '
                        'set config.skip_corrupt_images=True to skip undecodable files.')
  return None


def make_train_iterator(config, *, start_step: int = 0, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> Iterator[dict]:
  """Infinite iterator of this process's local multi-crop batches.

  Yields:
    {'global': float32 [b, G, S, S, C], 'local': float32 [b, L, s, s, C] (only
    when L > 0), 'label': int32 [b]} with b = batch_size // process_count.
    Batch k depends only on (seed, process_index, process_count, k).
  """
  cfg = resolve_config(config)
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(int(cfg.batch_size), process_count, 'batch_size')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  _hide_accelerators_from_tf()
  split = sources.open_split(cfg, cfg.train_split)
  if split.num_examples == 0:
    raise ValueError(f'split {cfg.train_split!r} of {cfg.dataset!r} is empty')
  spec = color_spec(cfg, _channels(split))
  global_views, local_views = augment.view_specs(cfg)
  if not global_views:
    raise ValueError('config.num_global_crops must be >= 1')
  groups = [global_views] + ([local_views] if local_views else [])
  kwargs = dict(start_step=start_step, process_index=process_index,
                process_count=process_count, local_batch=local_batch)
  if isinstance(split, sources.TfdsSplit):
    return _tfds_train_batches(split, cfg, spec, groups, **kwargs)
  ds = _random_access_train_dataset(split, cfg, spec, groups, **kwargs)
  return _numpy_batches(ds, split, lambda k: example_indices(train_positions(
      start_step + k, process_index, process_count, local_batch), split.num_examples,
                                                            cfg.seed))


_CORRUPT_SEARCH_BATCHES = 8


def _numpy_batches(ds, split, indices_of_batch) -> Iterator[dict]:
  """Numpy batches of ds; decode errors of image files name the file."""
  iterator = ds.as_numpy_iterator()
  k = 0
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      if isinstance(split, sources.FileSplit):
        # The failing element is in batch k, or slightly later when parallel
        # map and prefetch ran ahead.
        for ahead in range(_CORRUPT_SEARCH_BATCHES):
          error = _corrupt_file_error(split, indices_of_batch(k + ahead))
          if error is not None:
            raise error from e
      raise
    yield batch
    k += 1


def _even_shard(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  return n * process_index // process_count, n * (process_index + 1) // process_count


def num_eval_batches(num_examples: int, eval_batch_size: int, process_count: int) -> int:
  """Batches every process yields for a split of num_examples."""
  local_batch = eval_batch_size // process_count
  largest_shard = math.ceil(num_examples / process_count)
  return max(1, math.ceil(largest_shard / local_batch))


def make_eval_iterator(config, split: str, *, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> Iterator[dict]:
  """One deterministic pass over `split` (resize + center crop, no augmentation).

  Yields:
    {'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': bool [b]} with
    b = eval_batch_size // process_count; padded examples have mask False and
    zero image/label. All processes yield the same number of batches.
  """
  cfg = resolve_config(config)
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(int(cfg.eval_batch_size), process_count, 'eval_batch_size')
  _hide_accelerators_from_tf()
  data = sources.open_split(cfg, split)
  spec = color_spec(cfg, _channels(data))
  crop = int(cfg.eval_crop_size or cfg.global_crop_size)
  resize = augment.default_eval_resize(crop, cfg.eval_resize_size)
  num_batches = num_eval_batches(data.num_examples, int(cfg.eval_batch_size), process_count)
  total = num_batches * local_batch

  if isinstance(data, sources.TfdsSplit):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    _tfds_image_label(data)
    shard = tfds.split_for_jax_process(data.split, process_index=process_index,
                                       process_count=process_count)
    shard_size = int(data.builder.info.splits[shard].num_examples)
    records = _tfds_records(data, shard, cfg, shuffle_seed=None)

    @_no_autograph
    def real(record):
      image = augment.eval_view(record['image'], crop, resize, spec, encoded=True)
      return {'image': image, 'label': tf.cast(record['label'], tf.int32),
              'mask': tf.constant(True)}

    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros([crop, crop, spec.channels], tf.float32),
        'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}).repeat(
            total - shard_size)
    ds = records.map(real, num_parallel_calls=tf.data.AUTOTUNE).concatenate(padding)
  else:
    start, stop = _even_shard(data.num_examples, process_index, process_count)
    lookup, encoded = _lookup_fn(data)

    @_no_autograph
    def element(i):
      valid = start + i < stop
      index = tf.minimum(start + i, max(stop - 1, 0))
      image, label = lookup(index)
      image = augment.eval_view(image, crop, resize, spec, encoded=encoded)
      return {'image': image * tf.cast(valid, tf.float32),
              'label': tf.cast(label, tf.int32) * tf.cast(valid, tf.int32), 'mask': valid}

    if stop == start:  # This process has no examples: padding only.
      ds = tf.data.Dataset.from_tensors({
          'image': tf.zeros([crop, crop, spec.channels], tf.float32),
          'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}).repeat(total)
    else:
      ds = tf.data.Dataset.range(total).map(element, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(int(cfg.prefetch_batches))
  ds = ds.with_options(_options(cfg))
  if isinstance(data, sources.TfdsSplit):
    return _numpy_batches(ds, data, None)
  indices = lambda k: np.clip(  # pylint: disable=g-long-lambda
      start + np.arange(k * local_batch, (k + 1) * local_batch), start, max(stop - 1, 0))
  return _numpy_batches(ds, data, indices)
