"""The deterministic, resumable multi-crop train stream.

Per process p of P, local batch b = config.input.batch_size // P, global batch B:
  * Random-access splits (npz, IDX, imagefolder): local element l of process p is global
    stream position g = (l // b) * B + p * b + l % b, i.e. global batch k is split into P
    contiguous slices. Position g reads example index_shuffle(g mod N, seed(epoch = g // N))
    and augments it with seed fold(seed, g). Batch k is therefore index arithmetic on
    (config.seed, p, k): resuming at start_step=k starts the counter at k * b, costing nothing.
  * Streamed splits (TFDS): process p reads its even slice of the split; epoch e of that
    slice is a file-shuffled (seeded) and buffer-shuffled (seeded) record stream with seeds
    derived from (seed, p, e), re-created for each epoch. Local element l = e * n_p + i is
    augmented with seed fold(seed, p, l). Resuming at step k rebuilds epoch e = k * b // n_p
    and skips k * b mod n_p records before decoding, i.e. at most one epoch of record reads
    (no image decoding). Each epoch builds one new tf.data iterator (a few seconds on a busy
    2-core machine), negligible next to real epochs.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from bits_jax.data import augment
from bits_jax.data import common

_PERMUTATION_SALT, _AUGMENT_SALT = 1, 2


def _seed_int(*parts) -> int:
  """A 31-bit int seed derived from integers (for APIs that take Python seeds)."""
  digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _base_seed(seed: int, salt: int) -> tf.Tensor:
  return augment.fold_seed(tf.constant([int(seed), 0x5EED], tf.int64), salt)


def train_positions(
    step: int, process_index: int, process_count: int, local_batch: int
) -> np.ndarray:
  """Global stream positions [b] of process `process_index`'s batch `step`."""
  return step * local_batch * process_count + process_index * local_batch + np.arange(local_batch)


def example_index(position, num_examples: int, seed: int) -> tf.Tensor:
  """Example read at global stream position(s): one permutation per epoch."""
  position = tf.cast(position, tf.int64)
  epoch, offset = position // num_examples, position % num_examples
  perm_seed = augment.fold_seed(_base_seed(seed, _PERMUTATION_SALT), epoch)
  if num_examples == 1:
    return tf.zeros_like(offset)
  return tf.random.experimental.index_shuffle(
      offset, perm_seed, tf.constant(num_examples - 1, tf.int64)
  )


def example_indices(positions, num_examples: int, seed: int) -> np.ndarray:
  """Examples [n] read at global stream positions [n] (numpy)."""
  return np.array([int(example_index(p, num_examples, seed)) for p in positions])


def _views_fn(split, input_config):
  """(record, seed [2]) -> {'global': [G, S, S, C], 'local'?: [L, s, s, C], 'label'}."""
  spec = augment.color_spec(input_config)
  global_views, local_views = augment.view_specs(input_config)
  if not global_views:
    raise ValueError("config.input.crops.num_global must be >= 1")
  groups = [global_views] + ([local_views] if local_views else [])

  def views(record, seed):
    out = augment.multicrop(
        record["image"], seed, groups, spec, encoded=split.encoded, image_channels=split.channels
    )
    features = {"global": out[0], "label": record["label"]}
    if len(out) > 1:
      features["local"] = out[1]
    return features

  return views


def _random_access_batches(
    split,
    views,
    input_config,
    seed: int,
    *,
    start_step: int,
    process_index: int,
    process_count: int,
    local_batch: int,
) -> Iterator[dict]:
  n = split.num_examples
  global_batch = local_batch * process_count
  aug_seed = _base_seed(seed, _AUGMENT_SALT)

  @common.no_autograph
  def element(local_position):
    step, j = local_position // local_batch, local_position % local_batch
    position = step * global_batch + process_index * local_batch + j
    record = split.lookup(example_index(position, n, seed))
    return views(record, augment.fold_seed(aug_seed, position))

  ds = tf.data.Dataset.counter(start=start_step * local_batch, dtype=tf.int64)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(int(input_config.prefetch_batches)).with_options(common.options(input_config))

  def indices(k):
    return example_indices(
        train_positions(start_step + k, process_index, process_count, local_batch), n, seed
    )

  return common.numpy_batches(ds, split, indices)


def _streamed_batches(
    split,
    views,
    input_config,
    seed: int,
    *,
    start_step: int,
    process_index: int,
    process_count: int,
    local_batch: int,
) -> Iterator[dict]:
  shard_size = split.shard_size(process_index, process_count)
  if shard_size == 0:
    raise ValueError(
        f"process {process_index} got no examples of {input_config.dataset}:"
        f"{split.name}; use fewer processes or a larger split"
    )
  aug_seed = augment.fold_seed(_base_seed(seed, _AUGMENT_SALT), process_index)
  opts = common.options(input_config)
  prefetch, shuffle_buffer = int(input_config.prefetch_batches), int(input_config.shuffle_buffer)

  # Traced once and reused by every epoch's dataset.
  @functools.partial(tf.function, autograph=False)
  def element(local_position, record):
    return views(record, augment.fold_seed(aug_seed, local_position))

  def epoch_dataset(epoch: int, skip: int):
    epoch_seed = _seed_int(seed, process_index, epoch)
    ds = split.stream(process_index, process_count, shuffle_seed=epoch_seed, options=opts)
    ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate(start=epoch * shard_size).skip(skip)
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.with_options(opts)

  epoch, skip = divmod(start_step * local_batch, shard_size)
  pending = None  # Examples of a batch begun in the previous epoch.
  while True:
    # Batches stay aligned to multiples of b across epochs: `offset` zero placeholders stand
    # in for the examples pending from the previous epoch, so one dataset (one iterator to
    # build) serves the whole epoch.
    offset = (epoch * shard_size + skip) % local_batch
    ds = epoch_dataset(epoch, skip)
    if offset:
      placeholder = tf.data.Dataset.from_tensors(common.zeros(ds.element_spec))
      ds = placeholder.repeat(offset).concatenate(ds)
    ds = ds.batch(local_batch).prefetch(prefetch)
    for i, batch in enumerate(ds.as_numpy_iterator()):
      if i == 0 and offset:
        batch = {k: np.concatenate([pending[k], v[offset:]]) for k, v in batch.items()}
      if len(batch["label"]) == local_batch:
        yield batch
      else:
        pending = batch
    epoch, skip = epoch + 1, 0


def make_train_iterator(
    config,
    *,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict]:
  """Infinite iterator of this process's local multi-crop batches.

  Reads config.input and config.seed.

  Yields:
    {'global': float32 [b, G, S, S, C], 'local': float32 [b, L, s, s, C] (only when L > 0),
    'label': int32 [b] (bool [b, num_classes] for multi-label data)} with
    b = batch_size // process_count and C = config.input.num_channels.
    Batch k depends only on (config.seed, process_index, process_count, k).
  """
  input_config, seed = config.input, int(config.seed)
  process_index, process_count = common.process(process_index, process_count)
  local_batch = common.local_batch(input_config.batch_size, process_count, "batch_size")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  split = common.open_split(input_config, input_config.train_split)
  if split.num_examples == 0:
    raise ValueError(
        f"split {input_config.train_split!r} of {input_config.dataset!r} is "
        "empty; set config.input.train_split to a non-empty split"
    )
  batches = _random_access_batches if split.random_access else _streamed_batches
  return batches(
      split,
      _views_fn(split, input_config),
      input_config,
      seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      local_batch=local_batch,
  )
