"""PNG figures of the code statistics and retrieval curves.

Figures are built without pyplot (matplotlib.figure.Figure renders PNGs by itself), so
importing this module neither switches the process's backend nor keeps figures open: a
notebook that trains in its kernel still shows its own plots inline. save_plots writes the
figures; log_plots sends PNGs to a clu metric writer as uint8 images.
"""

import os
from typing import Any, Mapping, Optional, Sequence

import matplotlib.figure
import matplotlib.image
import matplotlib.ticker
import numpy as np

_DPI = 100


def _subplots(figsize, *grid, **kwargs):
  """(figure, axes) as pyplot's `subplots` gives them, outside pyplot's global state."""
  fig = matplotlib.figure.Figure(figsize=figsize)
  return fig, fig.subplots(*grid, **kwargs)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  return path


def plot_bit_balance(balance, path: str) -> str:
  """Histogram of the per-bit fraction of ones [b]."""
  fig, ax = _subplots((6, 4))
  ax.hist(np.asarray(balance), bins=50, range=(0.0, 1.0), color="tab:blue")
  ax.axvline(0.5, color="k", ls="--", lw=1)
  ax.set(xlabel="fraction of images with bit on", ylabel="number of bits", title="Bit balance")
  return _save(fig, path)


def plot_correlation(corr, path: str) -> str:
  """Heatmap of the bit-bit Pearson correlation [b, b]."""
  fig, ax = _subplots((6, 5))
  im = ax.imshow(np.asarray(corr), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
  fig.colorbar(im, ax=ax)
  ax.set(xlabel="bit", ylabel="bit", title="Bit correlation")
  return _save(fig, path)


def plot_class_activation(activation, path: str) -> str:
  """Class x bit activation map [C, b].

  Bits are ordered by the class that turns them on most, then by how
  strongly, so class-specific bits form a diagonal.
  """
  activation = np.asarray(activation)
  top_class = activation.argmax(axis=0)
  order = np.lexsort((-activation.max(axis=0), top_class))
  fig, ax = _subplots((7, 5))
  im = ax.imshow(
      activation[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
  )
  fig.colorbar(im, ax=ax, label="fraction of class images with bit on")
  ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set(xlabel="bit (sorted by top class)", ylabel="class index", title="Class x bit activation")
  return _save(fig, path)


def _precision_curve(metrics: Mapping[str, float]) -> tuple[list[int], list[float]]:
  points = sorted(
      (int(name.split("@", 1)[1]), value)
      for name, value in metrics.items()
      if name.startswith("precision@")
  )
  return [k for k, _ in points], [v for _, v in points]


def plot_precision_curve(curves: Mapping[str, Mapping[str, float]], path: str) -> str:
  """precision@k against k, one line per retrieval method."""
  fig, ax = _subplots((6, 4))
  for name, metrics in curves.items():
    ks, values = _precision_curve(metrics)
    if not ks:
      raise ValueError(
          f"retrieval results '{name}' have no 'precision@k' "
          "entries: run retrieval with precision_at set."
      )
    ax.plot(ks, values, marker="o", label=name)
  ax.set_xscale("log")
  ax.set(
      xlabel="k (retrieved items)",
      ylabel="precision@k",
      ylim=(0, 1.02),
      title="Retrieval precision",
  )
  ax.legend()
  ax.grid(alpha=0.3)
  return _save(fig, path)


def save_plots(
    analysis: Optional[Mapping[str, Any]], retrieval: Optional[Mapping[str, Any]], out_dir: str
) -> list[str]:
  """Writes the figures for whatever is given and returns their paths.

  Args:
    analysis: output of codes.analyze_codes (or None to skip).
    retrieval: one retrieval result dict (hamming_retrieval output), or
      {method name: result dict} to overlay several; None to skip.
    out_dir: created if missing.

  Returns:
    Paths of the written PNGs.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  if analysis is not None:
    paths.append(
        plot_bit_balance(analysis["bit_balance"], os.path.join(out_dir, "bit_balance.png"))
    )
    paths.append(
        plot_correlation(analysis["bit_corr"], os.path.join(out_dir, "bit_correlation.png"))
    )
    paths.append(
        plot_class_activation(
            analysis["class_bit_activation"], os.path.join(out_dir, "class_bit_activation.png")
        )
    )
  if retrieval is not None:
    nested = all(isinstance(v, Mapping) for v in retrieval.values())
    curves = retrieval if nested else {"hamming": retrieval}
    paths.append(plot_precision_curve(curves, os.path.join(out_dir, "retrieval_precision.png")))
  return paths


def png_to_uint8(path: str) -> np.ndarray:
  """Reads a PNG as uint8 RGB [1, H, W, 3] (alpha dropped)."""
  image = matplotlib.image.imread(path)
  if image.dtype != np.uint8:
    image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[None, ..., :3]


def log_plots(writer: Any, step: int, paths: Sequence[str], prefix: str = "plots/") -> None:
  """Logs PNGs through writer.write_images(step, {name: [1, H, W, 3]})."""
  images = {prefix + os.path.splitext(os.path.basename(p))[0]: png_to_uint8(p) for p in paths}
  if images:
    writer.write_images(step, images)


def _variant_length(name: str) -> int:
  return int(name[len("random") :] if name.startswith("random") else name)


def plot_map_vs_bits(results: Mapping[str, float], path: str) -> str:
  """mAP@ALL against code length: symmetric / asymmetric, first-L / random-L bits, with the
  continuous features' 'map_all' as a horizontal line when present."""
  fig, ax = _subplots((6, 4))
  for kind, label in (("codes", "Hamming"), ("asym", "asymmetric")):
    for random, style in ((False, "-o"), (True, "--s")):
      points = sorted(
          (_variant_length(key.split("/")[1]), value)
          for key, value in results.items()
          if key.startswith(kind + "/")
          and key.endswith("/map_all")
          and key.split("/")[1].startswith("random") == random
      )
      if points:
        ax.plot(*zip(*points), style, label=f"{label}, {'random' if random else 'first'} L")
  if "map_all" in results:
    ax.axhline(results["map_all"], color="k", ls=":", label="continuous features")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="code length L (bits)", ylabel="mAP@ALL", title="Retrieval vs code length")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_explained_variance(cumulative, path: str, thresholds=(0.9, 0.99)) -> str:
  """Cumulative explained variance [D] against the number of principal directions."""
  cumulative = np.asarray(cumulative)
  dims = np.arange(1, len(cumulative) + 1)
  fig, ax = _subplots((6, 4))
  ax.plot(dims, cumulative, color="tab:blue")
  for t in thresholds:
    ax.axhline(t, color="k", ls=":", lw=1)
  ax.set_xscale("log")
  ax.set(
      xlabel="principal directions",
      ylabel="cumulative explained variance",
      ylim=(0, 1.01),
      title="Feature covariance spectrum",
  )
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_embedding_3d(points, labels, path: str, title: str = "t-SNE of the codes") -> str:
  """3-D scatter of `points: [n, 3]` coloured by integer `labels: [n]`."""
  points = np.asarray(points)
  fig, ax = _subplots((6, 5), subplot_kw=dict(projection="3d"))
  ax.scatter(
      points[:, 0],
      points[:, 1],
      points[:, 2],
      c=np.asarray(labels),
      cmap="tab20",
      s=4,
      depthshade=False,
  )
  ax.set(title=title)
  return _save(fig, path)


def plot_image_grid(
    rows: Sequence[Sequence[Optional[np.ndarray]]],
    row_names: Sequence[str],
    column_names: Sequence[str],
    path: str,
    title: str = "",
) -> str:
  """A grid of uint8 images [H, W, C] (None: an empty tile), one named row each."""
  n_rows, n_cols = len(rows), max(len(r) for r in rows)
  figsize = (1.3 * n_cols + 0.6, 1.3 * n_rows + 0.4)
  fig, axes = _subplots(figsize, n_rows, n_cols, squeeze=False)
  for i, row in enumerate(rows):
    for j in range(n_cols):
      ax = axes[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      image = row[j] if j < len(row) else None
      if image is not None:
        image = np.asarray(image)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
      else:
        ax.set_facecolor("0.9")
      if i == 0 and j < len(column_names):
        ax.set_title(column_names[j], fontsize=7)
    axes[i, 0].set_ylabel(row_names[i], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def plot_training_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]], path: str, title: str = "Evaluation"
) -> str:
  """Fig. 4: one line per metric, {name: [(step, value)]} (e.g. curves.read_scalars)."""
  fig, ax = _subplots((6, 4))
  for name, points in sorted(curves.items()):
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker="o", ms=3, label=name)
  ax.set(xlabel="training step", ylabel="value", title=title)
  if curves:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, path)
