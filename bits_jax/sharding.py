"""Device mesh, partition rules and the shardings of the train state and the batch.

The mesh has two axes, always in this order: `data` (pure data parallelism: every device of
a row holds the same params) and `fsdp` (fully sharded data parallelism: large arrays are
split over it and all-gathered on use). The batch is split over both axes, so every device
sees `batch_size / num_devices` rows whatever the mesh shape.

`config.mesh = {'data': -1, 'fsdp': 1}` (pure data parallel) or e.g. `{'data': 2, 'fsdp': 4}`;
one size may be -1 ("the remaining devices"). Axis types are `Auto`: XLA's SPMD partitioner
inserts the collectives, and every loss sees global arrays, so batch statistics (coding rate,
messages) are over the global batch whatever the mesh.

Partition rules (`config.partition_rules`) map a leaf's path in the train state to a spec:
a sequence of `(regex, spec)`, first `re.search` match wins, no match = replicated. Paths
join the keys with '/', e.g. `params/backbone/block0/mlp/fc1/kernel`, and the optimizer's
moments of that kernel end in the same suffix (`opt_state/.../mu/backbone/block0/mlp/fc1/
kernel`), so one rule shards a param, its EMA teacher and its Adam moments the same way.
A spec is
  'replicated'             every device holds the whole array;
  'fsdp'                   arrays of at least `config.fsdp_min_size` elements are split over
                           `fsdp` along their largest dimension divisible by its size (else
                           replicated); the default rule for everything;
  a tuple, e.g. (None, 'fsdp')  an explicit PartitionSpec.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from bits_jax import utils

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both axes

DEFAULT_MESH = {DATA_AXIS: -1, FSDP_AXIS: 1}
DEFAULT_PARTITION_RULES = ((".*", "fsdp"),)
DEFAULT_FSDP_MIN_SIZE = 2**16


# -------------------------------------------------------------------------------- mesh


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `{'data': d, 'fsdp': f}` (one may be -1) and the device count."""
  spec = dict(DEFAULT_MESH if mesh_config is None else mesh_config)
  unknown = sorted(set(spec) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f"config.mesh has unknown axes {unknown}: use only {list(MESH_AXES)}, "
        "e.g. config.mesh = {'data': -1, 'fsdp': 1}."
    )
  sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={spec}: sizes must be positive or -1 (the rest).")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={spec}: at most one axis may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh={spec}: {num_devices} devices are not divisible by "
          f"{known}; pick axis sizes whose product divides {num_devices}."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
        f"config.mesh={spec} needs {int(np.prod(sizes))} devices but "
        f"{num_devices} are used: make the product of the sizes equal "
        f"{num_devices} or set one axis to -1."
    )
  return sizes[0], sizes[1]


def make_mesh(config: ml_collections.ConfigDict | None = None, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh` over all (or the given) devices, Auto axes."""
  devices = jax.devices() if devices is None else list(devices)
  mesh_config = None if config is None else config.get("mesh", None)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'): every device holds its own rows."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def check_batch_divisible(
    global_batch: int, mesh: Mesh, name: str = "batch_size", *, micro_batches: int = 1
) -> None:
  """Raises unless every micro-batch splits evenly over devices and processes."""
  if micro_batches < 1 or global_batch % micro_batches:
    raise ValueError(
        f"config.{name}={global_batch} is not divisible by "
        f"grad_accum_steps={micro_batches}: use a batch size that is a multiple "
        "of it, or change grad_accum_steps."
    )
  micro = global_batch // micro_batches
  n = mesh.devices.size
  if micro % n:
    what = (
        f"config.{name}={global_batch}"
        if micro_batches == 1
        else (f"the micro-batch {name} / grad_accum_steps = {micro}")
    )
    step = n * micro_batches
    lower, upper = (global_batch // step) * step, (global_batch // step + 1) * step
    raise ValueError(
        f"{what} is not divisible by the {n} devices of the mesh: use a {name} that is a "
        f"multiple of {step} (e.g. {lower or upper} or {upper})."
    )
  if global_batch % jax.process_count():
    raise ValueError(
        f"config.{name}={global_batch} is not divisible by the {jax.process_count()} processes."
    )


# ----------------------------------------------------------------------- partition rules


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Split the largest dimension divisible by `fsdp_size` (arrays of >= min_size elements)."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
  for i in dims:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = FSDP_AXIS
      return P(*spec)
  return P()


def _explicit_spec(spec, shape, mesh: Mesh, name: str) -> P:
  spec = P(*spec)
  if len(spec) > len(shape):
    raise ValueError(
        f"partition rule {tuple(spec)} for '{name}' has more entries than the "
        f"array's rank {len(shape)} (shape {shape}): fix config.partition_rules."
    )
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in axes:
      if axis not in mesh.axis_names:
        raise ValueError(
            f"partition rule for '{name}' names axis {axis!r}: use {list(mesh.axis_names)} or None."
        )
    size = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    if dim % size:
      raise ValueError(
          f"partition rule {tuple(spec)} splits a dimension of size {dim} of "
          f"'{name}' {shape} over {size} devices: change the rule or the mesh."
      )
  return spec


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh, config=None) -> P:
  """The PartitionSpec of the array at path `name` under `config.partition_rules`."""
  get = (lambda k, d: d) if config is None else config.get
  rules = get("partition_rules", DEFAULT_PARTITION_RULES)
  min_size = int(get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE))
  fsdp_size = mesh.shape.get(FSDP_AXIS, 1)
  for pattern, spec in rules:
    if re.search(pattern, name):
      if spec == "replicated":
        return P()
      if spec == "fsdp":
        return _fsdp_spec(tuple(shape), fsdp_size, min_size)
      if isinstance(spec, str):
        raise ValueError(
            f"partition rule spec {spec!r} (pattern {pattern!r}): use "
            "'replicated', 'fsdp' or a tuple of mesh axis names / None."
        )
      return _explicit_spec(spec, tuple(shape), mesh, name)
  return P()


def tree_shardings(tree, mesh: Mesh, config=None):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) from the rules."""

  def one(path, x):
    return NamedSharding(mesh, partition_spec(utils.path_name(path), np.shape(x), mesh, config))

  return jax.tree_util.tree_map_with_path(one, tree)


def abstract_state(components, config, mesh: Mesh):
  """Shapes, dtypes and shardings of the train state on `mesh`, without allocating it.

  Shardings come from the partition rules for `mesh`, not from a checkpoint, so Orbax
  restores a checkpoint written on any mesh (other device count, FSDP or pure data
  parallel) straight into this mesh's layout.
  """
  from bits_jax import train_state  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: train_state.create(components, config, jax.random.PRNGKey(0)))
  shardings = tree_shardings(shapes, mesh, config)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


def shardings_of(tree):
  """The `.sharding` of every leaf (arrays or sharded ShapeDtypeStructs)."""
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)
