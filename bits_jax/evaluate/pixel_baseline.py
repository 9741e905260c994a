"""The raw-pixel row: the k-NN evaluator's protocol on the input images themselves.

The images of the k-NN entry's bank and query splits go through the evaluation pipeline
(centre crop, channel conversion, normalisation: exactly what the model sees), are flattened
to [n, H * W * C] and classified with the same weighted cosine k-NN (`knn.knn_classify`).
A backbone that has learned something should beat this row.

`normalized=False` undoes the per-channel normalisation first (pixels in [0, 1]); the cosine
then equals the one on the stored uint8 values. On Fashion-MNIST (k=20, T=0.07, 60k bank,
10k queries) the two give 85.69% (normalised: centred pixels) and 84.59% (raw).
"""

from __future__ import annotations

from typing import Optional

from jax.sharding import Mesh
import ml_collections
import numpy as np

from bits_jax.evaluate import knn


def knn_entry(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `config.evals` entry of type 'knn' (the one named 'knn' first, else the first)."""
  entries = [e for e in config.evals.values() if e.type == "knn"]
  if "knn" in config.evals and config.evals.knn.type == "knn":
    return config.evals.knn
  if not entries:
    raise ValueError("config.evals has no entry of type 'knn': add one (e.g. evals.knn).")
  return entries[0]


def pixel_features(
    config: ml_collections.ConfigDict, split: str, *, normalized: bool = True
) -> dict[str, np.ndarray]:
  """{'pixels': [n, H*W*C] float32, 'label': [n], 'mask': [n] bool} of an eval split."""
  from bits_jax import data  # pylint: disable=g-import-not-at-top
  from bits_jax.data import augment  # pylint: disable=g-import-not-at-top

  spec = augment.color_spec(config.input)
  mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
  parts: dict[str, list[np.ndarray]] = {"pixels": [], "label": [], "mask": []}
  for batch in data.make_eval_iterator(config, split):
    images = np.asarray(batch["image"], np.float32)
    if not normalized:
      images = images * std + mean
    parts["pixels"].append(images.reshape(len(images), -1))
    parts["label"].append(np.asarray(batch["label"]))
    parts["mask"].append(np.asarray(batch["mask"], bool))
  if not parts["pixels"]:
    raise ValueError(f"split {split!r} of {config.input.dataset!r} yielded no batches.")
  return {k: np.concatenate(v) for k, v in parts.items()}


def pixel_knn(
    config: ml_collections.ConfigDict, mesh: Optional[Mesh] = None, *, normalized: bool = True
) -> dict[str, float]:
  """Weighted k-NN on pixels with the splits, ks and temperature of the k-NN evaluator.

  Args:
    config: the run's config; reads `config.input` and the k-NN entry of `config.evals`.
    mesh: optional device mesh; the bank is sharded over it (as in `knn.knn_classify`).
    normalized: pixels normalised as the model's inputs (True) or in [0, 1] (False).

  Returns:
    {'knn_top1_k{k}', 'knn_top5_k{k}'} as the k-NN evaluator returns them.
  """
  entry = knn_entry(config)
  bank = pixel_features(config, entry.bank_split, normalized=normalized)
  queries = pixel_features(config, entry.query_split, normalized=normalized)
  if bank["label"].ndim != 1:
    raise ValueError("pixel k-NN needs single-label data (labels [n]); got multi-hot labels.")
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  return knn.knn_classify(
      bank["pixels"],
      bank["label"],
      queries["pixels"],
      queries["label"],
      num_classes=int(data.get_dataset_info(config).num_classes),
      ks=tuple(entry.ks),
      temperature=float(entry.temperature),
      bank_mask=bank["mask"],
      query_mask=queries["mask"],
      mesh=mesh,
  )
