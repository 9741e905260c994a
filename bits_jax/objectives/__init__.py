"""The objective registry: `config.objective.name` -> an `Objective` (see `common.py`).

Adding a method is one module defining `OBJECTIVE` plus a line in `_REGISTRY`.
"""

import importlib

from bits_jax.objectives.common import FrozenParams
from bits_jax.objectives.common import Objective

_REGISTRY = {
    "bits": "bits_jax.objectives.bits",
    "dino": "bits_jax.objectives.dino",
    "simdino": "bits_jax.objectives.simdino",
}
NAMES = tuple(_REGISTRY)


def get(name: str) -> Objective:
  """The objective registered under `name`."""
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown method {name!r}: set config.objective.name to one of {sorted(_REGISTRY)}."
    )
  return importlib.import_module(_REGISTRY[name]).OBJECTIVE
