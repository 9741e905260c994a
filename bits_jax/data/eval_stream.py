"""One deterministic, padded pass over an eval split (resize + center crop, no augmentation).

The split is cut into P contiguous, even shards (one per process); every process yields
ceil(ceil(N / P) / b) batches of b = eval_batch_size // P, padding the tail with mask=False
examples (zero image, zero label, empty id), so that all processes run the same number of
steps.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from bits_jax.data import augment
from bits_jax.data import common


def num_eval_batches(num_examples: int, eval_batch_size: int, process_count: int) -> int:
  """Batches every process yields for a split of num_examples."""
  local_batch = eval_batch_size // process_count
  largest_shard = math.ceil(num_examples / process_count)
  return max(1, math.ceil(largest_shard / local_batch))


def _even_shard(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  return n * process_index // process_count, n * (process_index + 1) // process_count


def make_eval_iterator(
    config,
    split: str,
    *,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    with_ids: bool = False,
) -> Iterator[dict]:
  """One pass over `split` of config.input.dataset (slicing allowed: 'test[:1000]').

  Yields:
    {'image': float32 [b, S, S, C], 'label': int32 [b] (bool [b, num_classes] for
    multi-label data), 'mask': bool [b], 'id': str [b] (only `with_ids`)} with
    b = eval_batch_size // process_count, S = eval_crop_size (default: the global crop size)
    and C = config.input.num_channels. Padded examples have mask False.
  """
  input_config = config.input
  process_index, process_count = common.process(process_index, process_count)
  local_batch = common.local_batch(input_config.eval_batch_size, process_count, "eval_batch_size")
  data = common.open_split(input_config, split)
  spec = augment.color_spec(input_config)
  crop = int(input_config.eval_crop_size or input_config.crops.global_size)
  resize = augment.default_eval_resize(crop, input_config.eval_resize_size)
  total = local_batch * num_eval_batches(
      data.num_examples, int(input_config.eval_batch_size), process_count
  )
  opts = common.options(input_config)
  # A finite pass needs no tuning, and with autotune on, the end of about half of the demo's
  # 60k-image feature passes stalled 10-14 s (tf.data's end-of-sequence and teardown under a
  # busy CPU; 26-30 s passes otherwise). AUTOTUNE maps then take tf.data's fixed default.
  opts.autotune.enabled = False

  def example(record):
    image = augment.eval_view(
        record["image"], crop, resize, spec, encoded=data.encoded, image_channels=data.channels
    )
    out = {"image": image, "label": record["label"], "mask": tf.constant(True)}
    if with_ids:
      out["id"] = record["id"]
    return out

  if data.random_access:
    start, stop = _even_shard(data.num_examples, process_index, process_count)
    num_real = stop - start

    def indices(k):
      return np.clip(
          start + np.arange(k * local_batch, (k + 1) * local_batch), start, max(stop - 1, 0)
      )

    if data.batch_lookup and num_real:
      # Arrays in memory: whole batches at once (one gather, one resize), padded in place.
      def batch(positions):
        record = data.lookup(tf.minimum(positions, stop - 1))
        mask = positions < stop
        out = {
            "image": augment.eval_views(record["image"], crop, resize, spec),
            "label": record["label"],
            **({"id": record["id"]} if with_ids else {}),
        }
        out = {k: _where_rows(mask, v, tf.zeros_like(v)) for k, v in out.items()}
        return dict(out, mask=mask)

      ds = (
          tf.data.Dataset.range(start, start + total)
          .batch(local_batch, drop_remainder=True)
          .map(common.no_autograph(batch), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(int(input_config.prefetch_batches))
      )
      return common.numpy_batches(ds.with_options(opts), data, indices)
    ds = tf.data.Dataset.range(start, stop).map(
        common.no_autograph(lambda i: example(data.lookup(i))), num_parallel_calls=tf.data.AUTOTUNE
    )
  else:
    if data.num_examples == 0:
      raise ValueError(
          f"split {split!r} of {input_config.dataset!r} is empty; evaluate a non-empty split"
      )
    num_real, indices = data.shard_size(process_index, process_count), None
    if num_real:
      records = data.stream(
          process_index, process_count, shuffle_seed=None, options=opts, with_ids=with_ids
      )
    else:  # TFDS refuses an empty shard: none of the whole split gives the element spec.
      records = data.stream(0, 1, shuffle_seed=None, options=opts, with_ids=with_ids).take(0)
    ds = records.map(common.no_autograph(example), num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(common.zeros(ds.element_spec))
  ds = ds.concatenate(padding.repeat(total - num_real))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(int(input_config.prefetch_batches))
  return common.numpy_batches(ds.with_options(opts), data, indices)


def _where_rows(mask: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """Rows of x [b, ...] where mask [b], else rows of y."""
  return tf.where(tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1)), x, y)
