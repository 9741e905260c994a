"""Patch-level k-NN segmentation probe on frozen patch-token features.

Every query patch takes the weighted k-NN label (knn.knn_predict) of the bank
patches; scores are mean IoU over classes and pixel accuracy, both at patch
resolution (labels are masks downsampled to the patch grid). Also holds a
tiny synthetic segmentation set (a bright square on noise) to show the probe
working end to end.
"""

from typing import Optional

from jax.sharding import Mesh
import numpy as np

from bits_jax.evaluate import common
from bits_jax.evaluate import knn


def downsample_mask(masks, patch_size: int, num_classes: int) -> np.ndarray:
  """Majority label of each patch: masks [n, H, W] -> [n, H/p, W/p] int32.

  Vote ties go to the lowest class id.
  """
  masks = np.asarray(masks)
  n, height, width = masks.shape
  if height % patch_size or width % patch_size:
    raise ValueError(
        f"mask size {height}x{width} is not a multiple of "
        f"patch_size={patch_size}: crop or resize first."
    )
  h, w = height // patch_size, width // patch_size
  patches = masks.reshape(n, h, patch_size, w, patch_size)
  counts = np.stack([(patches == c).sum(axis=(2, 4)) for c in range(num_classes)], axis=-1)
  return counts.argmax(axis=-1).astype(np.int32)


def patch_mean(images, patch_size: int) -> np.ndarray:
  """Mean over each patch: images [n, H, W, C] -> [n, H/p, W/p, C]."""
  images = np.asarray(images, np.float32)
  n, height, width, c = images.shape
  h, w = height // patch_size, width // patch_size
  return (
      images[:, : h * patch_size, : w * patch_size]
      .reshape(n, h, patch_size, w, patch_size, c)
      .mean(axis=(2, 4))
  )


def synthetic_squares(
    seed: int,
    n: int,
    *,
    image_size: int = 32,
    min_side: int = 8,
    max_side: int = 16,
    noise: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian-noise images, each with one bright square: class 1 = square.

  Args:
    seed: seeds the positions, sizes and noise.
    n: number of images.
    image_size: height = width of the images.
    min_side, max_side: square side range (inclusive), in pixels.
    noise: standard deviation of the background/foreground noise.

  Returns:
    images [n, S, S, 1] float32 (square mean 1, background mean 0) and masks
    [n, S, S] int32 in {0, 1}.
  """
  if not 1 <= min_side <= max_side <= image_size:
    raise ValueError(
        f"need 1 <= min_side ({min_side}) <= max_side ({max_side}) <= image_size ({image_size})."
    )
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, image_size, image_size), np.int32)
  for i in range(n):
    side = rng.integers(min_side, max_side + 1)
    top, left = rng.integers(0, image_size - side + 1, size=2)
    masks[i, top : top + side, left : left + side] = 1
  images = masks + noise * rng.normal(size=masks.shape)
  return images[..., None].astype(np.float32), masks


def _confusion(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts, rows = true label, cols = predicted."""
  return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(
      num_classes, num_classes
  )


def segmentation_scores(confusion: np.ndarray) -> dict[str, float]:
  """mIoU over classes that occur (in labels or predictions) and accuracy."""
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0
  iou = tp[present] / union[present]
  total = confusion.sum()
  return {
      "seg_miou": float(iou.mean()) if iou.size else 0.0,
      "seg_pixel_acc": float(tp.sum() / total) if total else 0.0,
  }


def patch_knn_segmentation(
    bank_feats,
    bank_labels,
    query_feats,
    query_labels,
    *,
    num_classes: int,
    k: int = 10,
    temperature: float = 0.07,
    ignore_index: int = -1,
    max_bank_patches: Optional[int] = None,
    seed: int = 0,
    mesh: Optional[Mesh] = None,
    block_size: int = 4096,
) -> dict[str, float]:
  """k-NN segmentation probe: label each query patch from the bank patches.

  Args:
    bank_feats: [n, h, w, d] patch features of the labelled images.
    bank_labels: [n, h, w] int patch labels (ignore_index: unlabelled).
    query_feats: [q, h', w', d] patch features to segment.
    query_labels: [q, h', w'] ground-truth patch labels.
    num_classes: number of segmentation classes.
    k, temperature: k-NN vote (see knn.knn_classify).
    ignore_index: label of patches that are neither neighbours nor scored.
    max_bank_patches: keep at most this many labelled bank patches, drawn
      uniformly with the seed (bounds memory for large banks).
    seed: seeds that subsample.
    mesh, block_size: passed to knn.knn_predict.

  Returns:
    {'seg_miou': mean IoU over classes present, 'seg_pixel_acc': accuracy
     over labelled query patches}.
  """
  bank_feats, query_feats = np.asarray(bank_feats), np.asarray(query_feats)
  bank_labels = np.asarray(bank_labels)
  query_labels = np.asarray(query_labels)
  if bank_feats.ndim != 4 or query_feats.ndim != 4:
    raise ValueError(
        f"patch features must be [n, h, w, d], got {bank_feats.shape} and {query_feats.shape}."
    )
  if bank_labels.shape != bank_feats.shape[:3] or query_labels.shape != query_feats.shape[:3]:
    raise ValueError(
        "patch labels must be [n, h, w] matching the features: "
        f"got {bank_labels.shape} for {bank_feats.shape} and "
        f"{query_labels.shape} for {query_feats.shape}; use "
        "downsample_mask to bring masks to the patch grid."
    )
  d = bank_feats.shape[-1]
  bank_x = bank_feats.reshape(-1, d)
  bank_y = bank_labels.reshape(-1)
  keep = bank_y != ignore_index
  bank_x, bank_y = bank_x[keep], bank_y[keep]
  if max_bank_patches is not None and len(bank_y) > max_bank_patches:
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(bank_y), max_bank_patches, replace=False))
    bank_x, bank_y = bank_x[pick], bank_y[pick]
  query_x = query_feats.reshape(-1, query_feats.shape[-1])
  query_y = query_labels.reshape(-1)
  scored = query_y != ignore_index
  query_x, query_y = query_x[scored], query_y[scored]
  if query_y.size and (query_y.min() < 0 or query_y.max() >= num_classes):
    raise ValueError(
        f"query labels must lie in [0, {num_classes}) or equal "
        f"ignore_index={ignore_index}: check num_classes."
    )
  preds = knn.knn_predict(
      bank_x,
      bank_y,
      query_x,
      num_classes=num_classes,
      k=k,
      temperature=temperature,
      mesh=mesh,
      block_size=block_size,
  )
  return segmentation_scores(_confusion(preds, query_y, num_classes))


@common.register("dense")
def run(ctx, *, num_images: int = 64, k: int = 10) -> dict[str, float]:
  """Patch k-NN segmentation of synthetic squares sized for the model's crops."""
  size, seed = ctx.config.input.crops.global_size, ctx.config.seed
  patch = ctx.patch_size
  sides = dict(image_size=size, min_side=max(patch, size // 4), max_side=max(patch, size // 2))
  bank_images, bank_masks = synthetic_squares(seed, num_images, **sides)
  query_images, query_masks = synthetic_squares(seed + 1, num_images // 2, **sides)
  channels = ctx.config.input.num_channels

  def patch_features(images):
    tokens = ctx.predict(np.repeat(images, channels, axis=-1), outputs=("patch_tokens",))[
        "patch_tokens"
    ]
    grid = int(round(tokens.shape[1] ** 0.5))  # ViT: size / patch; ResNet: its output stride
    return tokens.reshape(len(images), grid, grid, -1)

  bank_feats, query_feats = patch_features(bank_images), patch_features(query_images)
  stride = size // bank_feats.shape[1]
  return patch_knn_segmentation(
      bank_feats,
      downsample_mask(bank_masks, stride, 2),
      query_feats,
      downsample_mask(query_masks, stride, 2),
      num_classes=2,
      k=k,
  )
