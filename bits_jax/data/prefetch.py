"""Double-buffered host-to-device transfer of per-process batches."""

from __future__ import annotations

import collections
import itertools
from typing import Iterator, Union

import jax
import numpy as np


def _batch_sharding(sharding_or_mesh_and_spec) -> jax.sharding.Sharding:
  if isinstance(sharding_or_mesh_and_spec, jax.sharding.Sharding):
    return sharding_or_mesh_and_spec
  if (
      isinstance(sharding_or_mesh_and_spec, (tuple, list))
      and len(sharding_or_mesh_and_spec) == 2
      and isinstance(sharding_or_mesh_and_spec[0], jax.sharding.Mesh)
  ):
    mesh, spec = sharding_or_mesh_and_spec
    if not isinstance(spec, jax.sharding.PartitionSpec):
      spec = (
          jax.sharding.PartitionSpec(*spec)
          if isinstance(spec, (tuple, list))
          else (jax.sharding.PartitionSpec(spec))
      )
    return jax.sharding.NamedSharding(mesh, spec)
  raise TypeError(
      'prefetch_to_mesh needs a jax.sharding.Sharding or a (Mesh, '
      f'PartitionSpec) pair, got {type(sharding_or_mesh_and_spec).__name__}'
  )


def _to_global(batch, sharding: jax.sharding.Sharding):
  """Local numpy arrays (batch axis 0) -> global jax.Arrays with `sharding`."""

  def put(x):
    x = np.asarray(x)
    spec = getattr(sharding, 'spec', None)
    if spec is not None and len(spec) > x.ndim:
      # A rank-2 spec such as P('data', None) applied to labels [b]: keep axis 0.
      sharding_x = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(*spec[: x.ndim])
      )
    else:
      sharding_x = sharding
    return jax.make_array_from_process_local_data(sharding_x, x)

  return jax.tree_util.tree_map(put, batch)


def prefetch_to_mesh(
    iterator: Iterator,
    sharding_or_mesh_and_spec: Union[jax.sharding.Sharding, tuple],
    size: int = 2,
) -> Iterator:
  """Yields global jax.Arrays built from local batches, `size` batches ahead.

  Args:
    iterator: yields pytrees of numpy arrays whose axis 0 is this process's
      slice of the global batch.
    sharding_or_mesh_and_spec: sharding of the batch axis, e.g.
      NamedSharding(mesh, P('data')) or (mesh, P('data')); trailing axes of
      the spec beyond an array's rank are dropped, so one spec serves images
      and labels.
    size: number of batches whose transfer is started ahead of use.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}')
  sharding = _batch_sharding(sharding_or_mesh_and_spec)
  queue = collections.deque()
  iterator = iter(iterator)
  failure = []  # The source's exception, raised once the batches before it are out.

  def enqueue(n):
    if failure:
      return
    try:
      # make_array_from_process_local_data starts async device transfers.
      for batch in itertools.islice(iterator, n):
        queue.append(_to_global(batch, sharding))
    except Exception as e:  # pylint: disable=broad-exception-caught
      failure.append(e)

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
  if failure:
    raise failure[0]
