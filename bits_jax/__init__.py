"""BITS: self-supervised learning as discrete communication, in JAX/Flax.

`bits_jax.load_backbone(path) -> (apply_fn, params, config)` loads a trained or converted
backbone (see `bits_jax/loading.py`); it is imported on first use, so `import bits_jax`
stays cheap (no JAX, TensorFlow or Orbax).
"""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("bits_jax")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
  __version__ = "0.0.0+unknown"

_LAZY = {"load_backbone": "bits_jax.loading"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'bits_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
