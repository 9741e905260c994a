"""Runs a frozen model over an eval iterator and collects its outputs on host."""

from typing import Any, Callable, Iterable, Mapping, Optional

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
    iterator: yields {'image': [b, H, W, C], 'label': [b], 'mask': [b]}
      (numpy or global jax arrays; 'mask' defaults to all rows valid).
    mesh: if given, numpy batches are placed on it as process-local shards,
      split along the batch over all mesh axes.

  Returns:
    {output name: [n, ...], 'label': [n], 'mask': [n] bool} as numpy, with n
    the total number of rows seen (padding rows included; use 'mask').
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
    for reserved in ("label", "mask"):
      if reserved in outputs:
        raise ValueError(
            f"apply_fn output key '{reserved}' clashes with the "
            "batch field of that name: rename the output."
        )
    host = {name: utils.to_host(value) for name, value in outputs.items()}
    host["label"] = utils.to_host(labels)
    host["mask"] = utils.to_host(mask).astype(bool)
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
