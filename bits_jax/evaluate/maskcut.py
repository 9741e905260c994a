"""MaskCut (Wang et al. 2023, "Cut and Learn"): unsupervised object masks by normalised cuts.

Per image (resized to image_size x image_size): the keys of the last attention block,
L2-normalised per patch, give the graph W_ij = 1 if cos_ij > tau else eps (eps = 1e-5). The
second-smallest generalised eigenvector y of (D - W) y = lambda D y splits the patches at
mean(y); the foreground is the side holding the entry of largest |y|, unless that side covers
3 or 4 of the grid's corners (then the other side). The mask is the 4-connected component of
the foreground containing the seed (the extreme entry of y on the foreground side). Up to
`max_masks` masks come from repeating the cut after zeroing the features of every patch found
so far (their affinities become eps); a later mask is dropped when it overlaps the previous
one with IoU > 0.5 or covers <= 1% of the grid, and patches of earlier masks are removed from
it. Masks are resized to the original image (bicubic, threshold 1/2), boxes come from the
masks, and the k-th mask of an image gets the score (max_masks - k) / max_masks. CutLER's
optional CRF refinement is not applied.

Scores are class-agnostic COCO AP, AP50, AP75 of boxes and masks (coco_ap). Data: COCO
val2017 images with the instances json, or a prepared TFDS `coco/2017` (boxes only) or
`coco/2017_panoptic` (masks of its thing segments), see tfds_dense.
"""

import collections
import functools
import json
import os
from typing import Any, Iterator, Optional

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from bits_jax.evaluate import coco_ap
from bits_jax.evaluate import common
from bits_jax.evaluate import tfds_dense

# The paper's rows as ../shared/PAPER.md states them: {method: {metric: value}}. Tab. 6
# reports MaskCut detection and segmentation on COCO val2017 as AP50 / AP75 / AP, but the fact
# sheet gives none of its numbers, so there is no row to print.
paper_table = "Tab. 6: MaskCut unsupervised detection and segmentation, COCO val2017"
paper_reference: dict[str, dict[str, float]] = {}

EPS = 1e-5
_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180)]


# ----------------------------------------------------------------------------- ViT keys


def apply_with_last_keys(model, variables, images, **kwargs):
  """(model outputs, keys of the last attention block [n, h * w, D] float32) in one pass.

  `model` is a ViT (bits_jax.models.vit.ViT, or a module whose ViT's last block is named
  `block{depth-1}`); the keys are captured with flax's capture_intermediates, so the
  parameters are untouched. D = heads x head_dim, heads-major (DINO's layout); the CLS
  token is dropped.
  """
  depth = getattr(model, "depth", None)
  if depth is None:
    raise ValueError(
        f"last-block keys need a ViT backbone; {type(model).__name__} has none "
        "(MaskCut runs on ViT checkpoints only)."
    )
  target = (f"block{depth - 1}", "attn", "key")

  def wanted(module, method_name):
    return method_name == "__call__" and tuple(module.path[-3:]) == target

  out, state = model.apply(
      variables, images, capture_intermediates=wanted, mutable=["intermediates"], **kwargs
  )
  found = [
      v
      for k, v in traverse_util.flatten_dict(state["intermediates"]).items()
      if tuple(k[-4:]) == target + ("__call__",)
  ]
  if len(found) != 1:
    raise ValueError(f"found {len(found)} captures of {'/'.join(target)}: is this a ViT?")
  keys = found[0][0]  # [n, tokens, heads, head_dim]
  n, h, w = images.shape[0], images.shape[1], images.shape[2]
  p = model.patch_size
  keys = keys[:, -(h // p) * (w // p) :]  # drop the CLS token
  return out, keys.reshape(n, keys.shape[1], -1).astype(jnp.float32)


def last_block_keys(model, variables, images, **kwargs) -> jax.Array:
  """Keys of the last attention block [n, h * w, D] (see apply_with_last_keys)."""
  return apply_with_last_keys(model, variables, images, **kwargs)[1]


# ----------------------------------------------------------------------------- NCut


def affinity(feats: jax.Array, tau: float, eps: float = EPS) -> jax.Array:
  """[n, D] features -> [n, n] graph: 1 where cos > tau, else eps (zero rows: all eps)."""
  feats = feats.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(feats * feats, -1, keepdims=True))
  feats = feats / jnp.maximum(norm, 1e-12)
  cos = jnp.matmul(feats, feats.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(cos > tau, 1.0, eps)


def second_smallest_eigenvector(w: jax.Array) -> jax.Array:
  """y of the second-smallest lambda in (D - W) y = lambda D y, scaled to y^T D y = 1.

  Solved as the symmetric problem D^-1/2 (D - W) D^-1/2 u = lambda u, y = D^-1/2 u.
  """
  d_isqrt = jax.lax.rsqrt(w.sum(axis=1))
  laplacian = jnp.eye(w.shape[0], dtype=w.dtype) - d_isqrt[:, None] * w * d_isqrt[None, :]
  _, vecs = jnp.linalg.eigh(laplacian, symmetrize_input=True)
  return vecs[:, 1] * d_isqrt


def component_of(mask: jax.Array, seed: jax.Array) -> jax.Array:
  """The 4-connected component of `mask` [h, w] bool containing flat index `seed`."""
  h, w = mask.shape
  start = (jnp.arange(h * w) == seed).reshape(h, w) & mask

  def grow(state):
    reach, _ = state
    pad = jnp.pad(reach, 1)
    grown = mask & (reach | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:])
    return grown, jnp.any(grown != reach)

  reach, _ = jax.lax.while_loop(lambda s: s[1], grow, (start, jnp.array(True)))
  return reach


def _iou(a, b):
  union = jnp.sum(a | b)
  return jnp.where(union > 0, jnp.sum(a & b) / jnp.maximum(union, 1), 0.0)


def maskcut_masks(
    feats: jax.Array,
    *,
    grid: tuple[int, int],
    tau: float = 0.15,
    max_masks: int = 3,
    eps: float = EPS,
) -> jax.Array:
  """MaskCut masks of one image on the patch grid.

  Args:
    feats: [h * w, D] patch features (the last block's keys).
    grid: (h, w).
    tau, max_masks, eps: see the module doc.

  Returns:
    [max_masks, h, w] bool; a dropped mask is all False.
  """
  h, w = grid
  painted = jnp.zeros(h * w, bool)
  previous = jnp.zeros((h, w), bool)
  taken = jnp.zeros((h, w), bool)
  masks = []
  for i in range(max_masks):
    y = second_smallest_eigenvector(affinity(jnp.where(painted[:, None], 0.0, feats), tau, eps))
    fg = y > jnp.mean(y)
    corners = fg.reshape(h, w)[jnp.array([0, 0, -1, -1]), jnp.array([0, -1, 0, -1])].sum()
    flip = (corners >= 3) | ~fg[jnp.argmax(jnp.abs(y))]
    y, fg = jnp.where(flip, -y, y), jnp.where(flip, ~fg, fg)
    mask = component_of(fg.reshape(h, w), jnp.argmax(y))
    if i > 0:
      drop = (_iou(previous, mask) > 0.5) | (jnp.mean(mask) <= 0.01)
      mask = mask & ~drop
    previous = mask
    painted = painted | mask.reshape(-1)
    masks.append(mask & ~taken)
    taken = taken | mask
  return jnp.stack(masks)


@functools.partial(jax.jit, static_argnames=("grid", "tau", "max_masks"))
def batch_masks(feats, *, grid, tau=0.15, max_masks=3):
  """maskcut_masks of a batch, jitted: [b, h * w, D] -> [b, max_masks, h, w] bool."""
  return jax.vmap(lambda f: maskcut_masks(f, grid=grid, tau=tau, max_masks=max_masks))(feats)


# ----------------------------------------------------------------------------- images


def read_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3] of an image file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"image {path} not found: check images_dir and the annotations' file_name entries."
    )
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3] with Lanczos, as MaskCut resizes its input."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def upsample_mask(mask: np.ndarray, size: tuple[int, int], square: int) -> np.ndarray:
  """Grid mask [h, w] -> [H, W] bool: nearest to square x square, bicubic to the original
  size, threshold at one half (CutLER's resize of its pseudo-masks)."""
  patch = square // mask.shape[0]
  big = np.repeat(np.repeat(mask.astype(np.uint8) * 255, patch, 0), patch, 1)
  resized = np.asarray(Image.fromarray(big).resize((size[1], size[0]), Image.Resampling.BICUBIC))
  return resized > 127


def detections_from_masks(
    masks: np.ndarray, image_id: int, size: tuple[int, int], square: int
) -> list[dict[str, Any]]:
  """COCO detections (bbox, RLE segmentation, score) of one image's grid masks [k, h, w]."""
  out = []
  k = len(masks)
  for i, mask in enumerate(masks):
    if not mask.any():
      continue
    full = upsample_mask(mask, size, square)
    if not full.any():
      continue
    rle = coco_ap.encode_mask(full)
    out.append({
        "image_id": int(image_id),
        "score": (k - i) / k,
        "segmentation": rle,
        "bbox": coco_ap.mask_box(rle),
        "mask": full,
    })
  return out


def _save_example(path: str, image: np.ndarray, detections: list[dict[str, Any]]):
  canvas = image.astype(np.float32)
  for i, det in enumerate(detections):
    color = np.array(_COLORS[i % len(_COLORS)], np.float32)
    canvas = np.where(det["mask"][..., None], 0.5 * canvas + 0.5 * color, canvas)
  picture = Image.fromarray(canvas.astype(np.uint8))
  draw = ImageDraw.Draw(picture)
  for i, det in enumerate(detections):
    x, y, w, h = det["bbox"]
    draw.rectangle([x, y, x + w, y + h], outline=_COLORS[i % len(_COLORS)], width=2)
  picture.save(path)


# ----------------------------------------------------------------------------- data

ImageRecord = tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]  # info, image, anns


def directory_images(
    images_dir: str, annotations: str, max_images: Optional[int] = None
) -> Iterator[ImageRecord]:
  """(image info, uint8 [H, W, 3], its annotations) of an instances json, by image id."""
  if not os.path.isfile(annotations):
    raise FileNotFoundError(
        f"annotations {annotations} not found: give the COCO instances "
        "json (annotations/instances_val2017.json)."
    )
  with open(annotations, encoding="utf-8") as f:
    dataset = json.load(f)
  images = sorted(dataset["images"], key=lambda im: im["id"])
  if max_images:
    images = images[:max_images]
  by_image = collections.defaultdict(list)
  for ann in dataset["annotations"]:
    by_image[ann["image_id"]].append(ann)
  for info in images:
    path = os.path.join(images_dir, info["file_name"])
    image = read_rgb(path)
    want = (info.get("height", image.shape[0]), info.get("width", image.shape[1]))
    if image.shape[:2] != want:
      raise ValueError(
          f"image {path} is {image.shape[0]}x{image.shape[1]} but {annotations} says "
          f"{want[0]}x{want[1]}."
      )
    yield info, image, by_image[info["id"]]


def _batches(records: Iterator[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
  batch = []
  for record in records:
    batch.append(record)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


@common.register("maskcut")
def run(
    ctx,
    *,
    images_dir: Optional[str] = None,
    annotations: Optional[str] = None,
    tfds_name: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    tfds_split: str = "validation",
    tau: float = 0.15,
    max_masks: int = 3,
    image_size: int = 480,
    max_images: Optional[int] = None,
    batch_size: int = 8,
    save_examples: int = 4,
) -> dict:
  """MaskCut on COCO: class-agnostic box and mask AP, AP50, AP75.

  Args:
    ctx: the EvalContext (needs predict(..., outputs=('last_keys',)), i.e. a ViT).
    images_dir: folder of the images (COCO: val2017/), with `annotations`.
    annotations: instances json (COCO: annotations/instances_val2017.json).
    tfds_name: instead of the two above, a prepared TFDS builder: 'coco/2017' (boxes only:
      no mask AP) or 'coco/2017_panoptic' (mask AP against its thing segments).
    tfds_data_dir: TFDS data_dir (None: TFDS's default).
    tfds_split: the TFDS split (COCO val2017: 'validation').
    tau, max_masks, image_size: MaskCut's threshold, masks per image and square input size.
    max_images: evaluate the first images only (AP over those images; a directory: lowest
      ids, TFDS: its record order).
    batch_size: images per forward pass.
    save_examples: images drawn with their masks and boxes under out_dir/plots.

  Returns:
    {'box/AP', 'box/AP50', 'box/AP75', 'mask/AP', 'mask/AP50', 'mask/AP75' (when the ground
     truth has masks), 'mask_ground_truth', 'num_images', 'masks_per_image'} (fractions).
  """
  if tfds_name:
    records = tfds_dense.coco_images(tfds_name, tfds_split, tfds_data_dir, max_images)
    with_masks = tfds_dense.has_masks(tfds_name, tfds_data_dir)
    source = f"TFDS {tfds_name} panoptic things" if with_masks else "none (boxes only)"
  elif images_dir and annotations:
    records = directory_images(images_dir, annotations, max_images)
    with_masks, source = True, "instances json"
  else:
    raise common.MissingData(
        "the maskcut evaluator needs images_dir=<COCO val2017/> and "
        "annotations=<annotations/instances_val2017.json>, or tfds_name='coco/2017'."
    )
  if image_size % ctx.patch_size:
    raise ValueError(
        f"image_size={image_size} is not a multiple of the patch size {ctx.patch_size}."
    )
  grid = (image_size // ctx.patch_size,) * 2
  plot_dir = None
  if ctx.out_dir is not None and save_examples:
    plot_dir = os.path.join(ctx.out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)

  detections, infos, gt_annotations = [], [], []
  for batch in _batches(records, batch_size):
    pixels = np.stack([square_resize(image, image_size) for _, image, _ in batch])
    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(batch), 0)])
    keys = ctx.predict(ctx.normalize(pixels), outputs=("last_keys",))["last_keys"]
    if keys.shape[:2] != (batch_size, grid[0] * grid[1]):
      raise ValueError(
          f"last_keys is {keys.shape}, expected [{batch_size}, "
          f"{grid[0] * grid[1]}, D] for {image_size}px images."
      )
    masks = np.asarray(
        batch_masks(jnp.asarray(keys), grid=grid, tau=float(tau), max_masks=int(max_masks))
    )
    for j, (info, image, anns) in enumerate(batch):
      dets = detections_from_masks(masks[j], info["id"], image.shape[:2], image_size)
      if plot_dir is not None and len(infos) < save_examples:
        path = os.path.join(plot_dir, f"maskcut_{info['id']}.png")
        _save_example(path, image, dets)
        ctx.add_plot(path)
      infos.append(info)
      gt_annotations.extend(anns)
      detections.extend({k: v for k, v in d.items() if k != "mask"} for d in dets)
    logging.log_every_n_seconds(logging.INFO, "maskcut: %d images", 60, len(infos))

  gt = coco_ap.agnostic_ground_truth({"images": infos, "annotations": gt_annotations})
  iou_types = ("bbox", "segm") if with_masks else ("bbox",)
  results = coco_ap.class_agnostic_ap(gt, detections, iou_types)
  results["mask_ground_truth"] = source
  results["num_images"] = len(infos)
  results["masks_per_image"] = len(detections) / max(len(infos), 1)
  return results
