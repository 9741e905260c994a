"""Input pipeline: dataset sources, multi-crop augmentation, iterators, prefetch."""

from bits_jax.data.pipeline import default_data_config
from bits_jax.data.pipeline import make_eval_iterator
from bits_jax.data.pipeline import make_train_iterator
from bits_jax.data.sources import DatasetInfo
from bits_jax.data.sources import get_dataset_info
