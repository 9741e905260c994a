"""Runs a frozen model over an eval iterator and collects its outputs on host."""

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from bits_jax import utils


def extract_features(
    apply_fn: Callable[[Any], Mapping[str, Any]],
    iterator: Iterable[Mapping[str, Any]],
    *,
    mesh: Optional[Mesh] = None,
) -> dict[str, np.ndarray]:
  """Applies apply_fn to every batch and concatenates the outputs.

  Args:
    apply_fn: images [b, H, W, C] -> dict of arrays [b, ...]; already jitted
      and closed over the parameters.
    iterator: yields {'image': [b, H, W, C], 'label': [b], 'mask': [b], 'id'?: str [b]}
      (numpy or global jax arrays; 'mask' defaults to all rows valid; 'id', this process's
      image ids, is carried along when present).
    mesh: if given, numpy batches are placed on it as process-local shards,
      split along the batch over all mesh axes.

  Returns:
    {output name: [n, ...], 'label': [n], 'mask': [n] bool, 'id'?: [n] str} as numpy,
    with n the total number of rows seen (padding rows included; use 'mask').
  """
  sharding = None
  if mesh is not None:
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  collected: dict[str, list[np.ndarray]] = {}
  for i, batch in enumerate(iterator):
    if "image" not in batch or "label" not in batch:
      raise ValueError(
          f"eval batch {i} has keys {sorted(batch)}: expected "
          "'image', 'label' and optionally 'mask'."
      )
    images, labels = batch["image"], batch["label"]
    mask = batch.get("mask")
    if mask is None:
      mask = np.ones(np.shape(labels)[0], bool)
    if sharding is not None:
      images = utils.to_global(images, sharding, "batch['image']")
      labels = utils.to_global(labels, sharding, "batch['label']")
      mask = utils.to_global(mask, sharding, "batch['mask']")
    outputs = apply_fn(images)
    if not isinstance(outputs, Mapping):
      raise TypeError(
          f"apply_fn must return a dict of [b, ...] arrays, got {type(outputs).__name__}."
      )
    for reserved in ("label", "mask", "id"):
      if reserved in outputs:
        raise ValueError(
            f"apply_fn output key '{reserved}' clashes with the "
            "batch field of that name: rename the output."
        )
    host = {name: utils.to_host(value) for name, value in outputs.items()}
    host["label"] = utils.to_host(labels)
    host["mask"] = utils.to_host(mask).astype(bool)
    if "id" in batch:
      host["id"] = gather_ids(batch["id"], sharding)
    b = host["label"].shape[0]
    for name, value in host.items():
      if value.shape[:1] != (b,):
        raise ValueError(
            f"apply_fn output '{name}' has shape {value.shape}; "
            f"expected a leading batch dim of {b}."
        )
      collected.setdefault(name, []).append(value)
  if not collected:
    raise ValueError("the eval iterator yielded no batches.")
  return {name: np.concatenate(parts) for name, parts in collected.items()}


ID_BYTES = 256  # Width of an id on the wire between processes (UTF-8 bytes).


def ids_to_bytes(ids: Sequence[str], width: int = ID_BYTES) -> np.ndarray:
  """ids [b] str -> uint8 [b, width], zero-padded UTF-8."""
  out = np.zeros((len(ids), width), np.uint8)
  for i, key in enumerate(ids):
    raw = (key.decode() if isinstance(key, bytes) else str(key)).encode()
    if len(raw) > width or b"\0" in raw:
      raise ValueError(
          f"image id {key!r} is longer than {width} bytes or holds a NUL byte: "
          "shorten the dataset's ids."
      )
    out[i, : len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def bytes_to_ids(rows: np.ndarray) -> np.ndarray:
  """uint8 [b, width] zero-padded UTF-8 -> ids [b] str."""
  return np.array([bytes(r).rstrip(b"\0").decode() for r in np.asarray(rows, np.uint8)], str)


def gather_ids(ids, sharding: Optional[NamedSharding]) -> np.ndarray:
  """This process's ids [b] -> the global batch's ids, in the row order of its arrays.

  Strings cannot be jax arrays: across processes they travel as fixed-width bytes through
  the same global layout as the images (one process keeps its rows as they are).
  """
  if sharding is None or jax.process_count() == 1:
    return np.asarray([i.decode() if isinstance(i, bytes) else str(i) for i in ids], str)
  words = utils.to_global(ids_to_bytes(ids), sharding, "batch['id']")
  return bytes_to_ids(utils.to_host(words))
