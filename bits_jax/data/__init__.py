"""Input pipeline: data sources, multi-crop augmentation, train/eval streams, prefetch.

  make_train_iterator(config, *, start_step=0, process_index=None, process_count=None)
  make_eval_iterator(config, split, *, process_index=None, process_count=None, with_ids=False)
  get_dataset_info(config) -> DatasetInfo
  sources.check(config.input) -> problem string or None
  prefetch.prefetch_to_mesh(iterator, sharding, size)

Every function reads `config.input` (and the train stream `config.seed`); the defaults live
in `bits_jax/config_defaults.py`.
"""

from bits_jax.data import sources
from bits_jax.data.eval_stream import make_eval_iterator
from bits_jax.data.sources import DatasetInfo
from bits_jax.data.train_stream import make_train_iterator


def get_dataset_info(config) -> DatasetInfo:
  """Classes, split sizes, stored image shape and multi-label flag of config.input.dataset."""
  return sources.get(config.input).info()
