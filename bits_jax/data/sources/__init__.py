"""Data sources: a registry of `DataSource` kinds (see `core.py` for the interface).

  sources.get(config.input) -> DataSource     .open(split) -> Split, .info() -> DatasetInfo
  sources.check(config.input) -> str | None   what is wrong with config.input.dataset

Importing this package registers every source module below.
"""

from bits_jax.data.sources import core
from bits_jax.data.sources import idx
from bits_jax.data.sources import imagefolder
from bits_jax.data.sources import npz
from bits_jax.data.sources import tfds

DatasetInfo = core.DatasetInfo
Split = core.Split
check = core.check
get = core.get
parse_split = core.parse_split
