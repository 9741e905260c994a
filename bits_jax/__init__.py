"""BITS: self-supervised learning as discrete communication, in JAX/Flax."""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("bits_jax")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
  __version__ = "0.0.0+unknown"
