"""DAVIS region (J) and boundary (F) measures, as the official DAVIS-2017 toolkit computes them.

J is the IoU of a predicted and an annotated object mask (1 when both are empty). F is the
F-measure of boundary precision and recall: boundaries are the one-pixel maps of `seg2bmap`
(the Berkeley benchmark's thin boundary, offset half a pixel towards the origin), and a
boundary pixel matches when the other boundary lies within a disk of radius
ceil(0.008 * image diagonal) pixels. Semi-supervised scores skip the first frame (given) and
the last frame; each object's J and F are means over the remaining frames, and the dataset's
J, F means are over all objects of all sequences; J&F = (J + F) / 2.
"""

import math

import numpy as np
from scipy import ndimage

BOUNDARY_TOLERANCE = 0.008  # fraction of the image diagonal


def region_iou(pred, gt) -> float:
  """J of two binary masks [H, W]; 1.0 when both are empty."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if pred.shape != gt.shape:
    raise ValueError(f"mask shapes differ: prediction {pred.shape} vs annotation {gt.shape}.")
  union = np.count_nonzero(pred | gt)
  if union == 0:
    return 1.0
  return np.count_nonzero(pred & gt) / union


def seg2bmap(mask) -> np.ndarray:
  """Thin boundary map [H, W] bool of a binary mask [H, W].

  A pixel is on the boundary when it differs from its east, south or south-east neighbour
  (outside the image counts as background for the last row/column, which compare only along
  the border; the bottom-right pixel is never a boundary).
  """
  seg = np.asarray(mask, bool)
  east = np.zeros_like(seg)
  south = np.zeros_like(seg)
  south_east = np.zeros_like(seg)
  east[:, :-1] = seg[:, 1:]
  south[:-1, :] = seg[1:, :]
  south_east[:-1, :-1] = seg[1:, 1:]
  bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
  bmap[-1, :] = seg[-1, :] ^ east[-1, :]
  bmap[:, -1] = seg[:, -1] ^ south[:, -1]
  bmap[-1, -1] = False
  return bmap


def boundary_radius(shape, tolerance: float = BOUNDARY_TOLERANCE) -> float:
  """Match radius in pixels: `tolerance` itself when >= 1, else ceil(tolerance * diagonal)."""
  if tolerance >= 1:
    return float(tolerance)
  return float(math.ceil(tolerance * math.hypot(shape[0], shape[1])))


def _dilate_disk(bmap: np.ndarray, radius: float) -> np.ndarray:
  """Dilation by the disk {x^2 + y^2 <= r^2}: pixels within Euclidean distance r of bmap."""
  if not bmap.any():
    return np.zeros_like(bmap)
  # The exact distance transform makes the cost independent of the radius.
  return ndimage.distance_transform_edt(~bmap) <= radius


def boundary_f(pred, gt, tolerance: float = BOUNDARY_TOLERANCE) -> float:
  """F of two binary masks [H, W] (precision = matched predicted boundary / predicted
  boundary, recall = matched annotated boundary / annotated boundary)."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if pred.shape != gt.shape:
    raise ValueError(f"mask shapes differ: prediction {pred.shape} vs annotation {gt.shape}.")
  radius = boundary_radius(pred.shape, tolerance)
  pred_b, gt_b = seg2bmap(pred), seg2bmap(gt)
  n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
  if n_pred == 0 and n_gt == 0:
    return 1.0
  if n_pred == 0 or n_gt == 0:
    return 0.0  # precision or recall is 0, the other 1 (the toolkit's convention)
  # Every boundary pixel lies in this crop, so distances inside it are exact.
  rows, cols = np.nonzero(pred_b | gt_b)
  margin = int(radius) + 1
  crop = (
      slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
      slice(max(cols.min() - margin, 0), cols.max() + margin + 1),
  )
  pred_b, gt_b = pred_b[crop], gt_b[crop]
  precision = np.count_nonzero(pred_b & _dilate_disk(gt_b, radius)) / n_pred
  recall = np.count_nonzero(gt_b & _dilate_disk(pred_b, radius)) / n_gt
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def frame_scores(pred_labels, gt_labels, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-object (J, F) of one frame.

  Args:
    pred_labels: [H, W] int predicted object ids (0 = background).
    gt_labels: [H, W] int annotated object ids (0 = background; the toolkit maps the void
      label 255 to background before scoring).
    num_objects: objects 1..num_objects are scored (the ids of the first frame).

  Returns:
    j, f: [num_objects] float64.
  """
  pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
  j = np.zeros(num_objects)
  f = np.zeros(num_objects)
  for k in range(num_objects):
    pred, gt = pred_labels == k + 1, gt_labels == k + 1
    j[k] = region_iou(pred, gt)
    f[k] = boundary_f(pred, gt)
  return j, f


def sequence_means(j_frames, f_frames) -> tuple[np.ndarray, np.ndarray]:
  """Per-object means over frames: [frames, objects] x 2 -> [objects] x 2 (NaN-aware)."""
  j_frames, f_frames = np.asarray(j_frames, float), np.asarray(f_frames, float)
  if j_frames.shape[0] == 0:
    nan = np.full(j_frames.shape[1:], np.nan)
    return nan, nan.copy()
  return np.nanmean(j_frames, axis=0), np.nanmean(f_frames, axis=0)


def summarize(per_sequence: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
  """Dataset scores from {sequence: (J per object [K], F per object [K])}.

  Returns:
    {'J_mean', 'F_mean', 'JF_mean'} over all objects, and per sequence 'seq/<name>/J',
    'seq/<name>/F' (means over its objects) and 'seq/<name>/JF' = (J + F) / 2.
  """
  if not per_sequence:
    raise ValueError("no sequence was scored.")
  j_all = np.concatenate([np.asarray(j, float) for j, _ in per_sequence.values()])
  f_all = np.concatenate([np.asarray(f, float) for _, f in per_sequence.values()])
  j_mean, f_mean = float(np.nanmean(j_all)), float(np.nanmean(f_all))
  out = {"J_mean": j_mean, "F_mean": f_mean, "JF_mean": (j_mean + f_mean) / 2}
  for name, (j, f) in per_sequence.items():
    j, f = float(np.nanmean(j)), float(np.nanmean(f))
    out.update({f"seq/{name}/J": j, f"seq/{name}/F": f, f"seq/{name}/JF": (j + f) / 2})
  return out
