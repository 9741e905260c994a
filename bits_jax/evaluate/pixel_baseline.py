"""The raw-pixel row: the k-NN evaluator's protocol on the input images themselves.

The images of the k-NN entry's bank and query splits go through the evaluation pipeline
(centre crop, channel conversion, normalisation: exactly what the model sees), are flattened
to [n, H * W * C] and classified with the same weighted cosine k-NN (`knn.knn_classify`).
A backbone that has learned something should beat this row. `PixelContext` gives the other
evaluators (retrieval, linear probe, geometry) the same pixels as their 'cls' features, and
`pixel_retrieval` is the paper's headline protocol (mAP@ALL) on them.

`normalized=False` undoes the per-channel normalisation first (pixels in [0, 1]); the cosine
then equals the one on the stored uint8 values. On Fashion-MNIST (k=20, T=0.07, 60k bank,
10k queries) the two give 85.69% (normalised: centred pixels) and 84.59% (raw); mAP@ALL
(10k queries against the 60k training images) 47.82% and 47.92%.
"""

from __future__ import annotations

import inspect
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


def _with_knn_defaults(entry: ml_collections.ConfigDict) -> dict:
  """The entry's splits, ks and temperature; keys it leaves out take knn.run's defaults."""
  defaults = inspect.signature(knn.run).parameters
  keys = ("bank_split", "query_split", "ks", "temperature")
  return {key: entry.get(key, defaults[key].default) for key in keys}


def _eval_pixels(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
  """{'pixels': [n, H*W*C] normalised float32, 'label': [n], 'mask': [n] bool} of a split."""
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  parts: dict[str, list[np.ndarray]] = {"pixels": [], "label": [], "mask": []}
  for batch in data.make_eval_iterator(config, split):
    images = np.asarray(batch["image"], np.float32)
    parts["pixels"].append(images.reshape(len(images), -1))
    parts["label"].append(np.asarray(batch["label"]))
    parts["mask"].append(np.asarray(batch["mask"], bool))
  if not parts["pixels"]:
    raise ValueError(f"split {split!r} of {config.input.dataset!r} yielded no batches.")
  return {k: np.concatenate(v) for k, v in parts.items()}


def _unnormalize(config: ml_collections.ConfigDict, pixels: np.ndarray) -> np.ndarray:
  """Normalised `[n, H*W*C]` pixels back to [0, 1] (channels last, so `C` varies fastest)."""
  from bits_jax.data import augment  # pylint: disable=g-import-not-at-top

  spec = augment.color_spec(config.input)
  mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
  n = len(pixels)
  return (pixels.reshape(n, -1, mean.size) * std + mean).reshape(n, -1)


def pixel_features(
    config: ml_collections.ConfigDict, split: str, *, normalized: bool = True
) -> dict[str, np.ndarray]:
  """{'pixels': [n, H*W*C] float32, 'label': [n], 'mask': [n] bool} of an eval split."""
  feats = _eval_pixels(config, split)
  if not normalized:
    feats["pixels"] = _unnormalize(config, feats["pixels"])
  return feats


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
  return pixel_knn_rows(config, mesh, variants=(normalized,))[normalized]


def pixel_knn_rows(
    config: ml_collections.ConfigDict,
    mesh: Optional[Mesh] = None,
    *,
    variants: tuple[bool, ...] = (False, True),
    context: Optional["PixelContext"] = None,
) -> dict[bool, dict[str, float]]:
  """`pixel_knn` for each `normalized` in `variants`, reading the splits once (through
  `context` when given, so its other evaluators reuse the reads)."""
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  entry = _with_knn_defaults(knn_entry(config))
  context = context or PixelContext(config, mesh)
  bank = context.read(entry["bank_split"])
  queries = context.read(entry["query_split"])
  if bank["label"].ndim != 1:
    raise ValueError("pixel k-NN needs single-label data (labels [n]); got multi-hot labels.")
  num_classes = int(data.get_dataset_info(config).num_classes)
  rows = {}
  for normalized in variants:
    pixels = {
        name: feats["pixels"] if normalized else _unnormalize(config, feats["pixels"])
        for name, feats in (("bank", bank), ("queries", queries))
    }
    rows[normalized] = knn.knn_classify(
        pixels["bank"],
        bank["label"],
        pixels["queries"],
        queries["label"],
        num_classes=num_classes,
        ks=tuple(entry["ks"]),
        temperature=float(entry["temperature"]),
        bank_mask=bank["mask"],
        query_mask=queries["mask"],
        mesh=mesh,
    )
  return rows


class PixelContext:
  """An evaluator context (see `common.EvalContext`) whose 'cls' features are the eval
  pipeline's flattened pixels, [n, H * W * C], normalised or in [0, 1]: no model, no head,
  so no codes. Each split is read once per context."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None, *, normalized: bool = True):
    from bits_jax import data  # pylint: disable=g-import-not-at-top

    self.config, self.mesh, self.step, self.out_dir = config, mesh, 0, None
    self.normalized = normalized
    self.num_classes = int(data.get_dataset_info(config).num_classes)
    self._reads: dict[str, dict[str, np.ndarray]] = {}
    self._features: dict[str, dict[str, np.ndarray]] = {}

  def read(self, split: str) -> dict[str, np.ndarray]:
    """{'pixels': [n, H*W*C] normalised, 'label': [n], 'mask': [n] bool} of a split."""
    if split not in self._reads:
      self._reads[split] = _eval_pixels(self.config, split)
    return self._reads[split]

  def features(self, split: str) -> dict[str, np.ndarray]:
    if split not in self._features:
      feats = self.read(split)
      pixels = feats["pixels"] if self.normalized else _unnormalize(self.config, feats["pixels"])
      self._features[split] = {"cls": pixels, "label": feats["label"], "mask": feats["mask"]}
    return self._features[split]

  def add_plot(self, path: str) -> None:
    del path  # no figures for the pixel row


def pixel_retrieval(
    context: PixelContext, names: tuple[str, ...] = ("retrieval",)
) -> dict[str, float]:
  """The `config.evals` entries `names` (retrieval: the paper's mAP@ALL) on the pixels of
  `context` (its variant, normalised or raw).

  Returns:
    {'<name>/<metric>': value} as `common.run_evaluators` returns them (no codes: pixels
    have no head).
  """
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top

  return common.run_evaluators(context, context.config.evals, list(names))
