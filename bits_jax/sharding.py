"""Device mesh and shardings: batch split over the `data` axis, params replicated."""
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(config: ml_collections.ConfigDict | None = None, devices=None) -> Mesh:
  """A 1-D mesh over all (or the given) devices with axis `data` (Auto axis type)."""
  del config
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes that carry data."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh, name: str = "batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n:
    lower, upper = (global_batch // n) * n, (global_batch // n + 1) * n
    raise ValueError(
        f"config.{name}={global_batch} is not divisible by the {n} devices of the mesh: "
        f"use a multiple of {n} (e.g. {lower or upper} or {upper}).")
  if global_batch % jax.process_count():
    raise ValueError(f"config.{name}={global_batch} is not divisible by the "
                     f"{jax.process_count()} processes.")
