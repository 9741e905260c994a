"""What the train and eval streams share: processes, batch split, split opening, tf.data setup."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import numpy as np
import tensorflow as tf

from bits_jax.data import sources

# Map functions are plain TF graph code: AutoGraph conversion of the Python loops over views
# would only add seconds of tracing.
no_autograph = tf.autograph.experimental.do_not_convert


def process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  """(process index, process count), from JAX where not given."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  return int(process_index), int(process_count)


def local_batch(global_batch: int, process_count: int, key: str) -> int:
  """This process's share of a global batch (`key` names the config key, for errors)."""
  global_batch = int(global_batch)
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f"config.input.{key}={global_batch} must be a positive multiple of the "
        f"process count {process_count}; change {key} to a multiple of it"
    )
  return global_batch // process_count


def options(input_config) -> tf.data.Options:
  """Deterministic tf.data options with config.input.threads private threads."""
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.max_intra_op_parallelism = 1
  if input_config.threads:
    opts.threading.private_threadpool_size = int(input_config.threads)
  return opts


def hide_accelerators_from_tf():
  """TF only feeds the host; keep it off GPUs/TPUs that JAX owns."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialized; nothing to do then.
    pass


_LOGGED_CONVERSIONS = set()


def check_channels(stored: int, input_config) -> None:
  """Accepts images of `stored` channels for config.input.num_channels, or says the fix.

  1 <-> 3 are converted by the augmentation (one log line per dataset); other mismatches
  raise.
  """
  wanted, dataset = int(input_config.num_channels), input_config.dataset
  if stored == wanted:
    return
  if {stored, wanted} != {1, 3}:
    raise ValueError(
        f"images of {dataset!r} have {stored} channels, "
        f"config.input.num_channels={wanted}: only 1 <-> 3 channels are "
        f"converted; set config.input.num_channels={stored} or store the images "
        f"with {wanted} channels"
    )
  if (dataset, stored, wanted) not in _LOGGED_CONVERSIONS:
    _LOGGED_CONVERSIONS.add((dataset, stored, wanted))
    how = "RGB -> grayscale (luma)" if wanted == 1 else "grayscale -> RGB (repeated)"
    logging.warning(
        "images of %r have %d channel(s), config.input.num_channels=%d: converting "
        "%s; set config.input.num_channels=%d to use them as stored",
        dataset,
        stored,
        wanted,
        how,
        stored,
    )


def open_split(input_config, split: str) -> sources.Split:
  """Opens `split` of config.input.dataset, checking its channels against num_channels."""
  hide_accelerators_from_tf()
  data = sources.get(input_config).open(split)
  check_channels(data.channels, input_config)
  return data


def zeros(element_spec) -> dict:
  """A zero element (empty strings, False) of a tf.data element spec."""
  return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), element_spec)


_CORRUPT_SEARCH_BATCHES = 8


def numpy_batches(
    ds: tf.data.Dataset,
    split: sources.Split,
    indices_of_batch: Optional[Callable[[int], np.ndarray]],
) -> Iterator[dict]:
  """Numpy batches of `ds`; a decode error names the bad file (`split.decode_error`).

  indices_of_batch(k): the example indices [b] of batch k (None: no search). String arrays
  (ids) come out as str.
  """
  iterator = ds.as_numpy_iterator()
  k = 0
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      # The failing element is in batch k, or slightly later when parallel map and
      # prefetch ran ahead.
      for ahead in range(_CORRUPT_SEARCH_BATCHES if indices_of_batch else 0):
        for i in np.unique(indices_of_batch(k + ahead)):
          problem = split.decode_error(int(i))
          if problem:
            raise ValueError(
                f"{problem}. Remove or fix it, or set "
                "config.input.skip_corrupt_images=True to skip undecodable "
                "files."
            ) from e
      raise
    if "id" in batch:
      batch["id"] = np.array([i.decode() for i in batch["id"]], dtype=str)
    yield batch
    k += 1
