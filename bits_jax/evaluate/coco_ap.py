"""Class-agnostic COCO AP, AP50, AP75 of boxes and masks, through pycocotools.

Every annotated category becomes one "object" category (crowd regions stay crowd, so
COCOeval ignores detections on them), and detections are scored against it with the
standard COCOeval (IoU 0.50:0.95, area 'all', 100 detections per image).
"""

import contextlib
import copy
import io
from typing import Any, Optional, Sequence

import numpy as np

AGNOSTIC_CATEGORY = 1


def _pycocotools():
  try:
    from pycocotools import coco, cocoeval, mask  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "COCO AP needs pycocotools: pip install pycocotools (the 'eval' extra of bits_jax)."
    ) from e
  return coco, cocoeval, mask


def agnostic_ground_truth(dataset: dict[str, Any], image_ids: Optional[Sequence[int]] = None):
  """A pycocotools COCO of `dataset` (instances json) with one category and only `image_ids`."""
  coco_lib, _, _ = _pycocotools()
  keep = None if image_ids is None else set(int(i) for i in image_ids)
  images = [im for im in dataset["images"] if keep is None or im["id"] in keep]
  anns = []
  for ann in dataset["annotations"]:
    if keep is None or ann["image_id"] in keep:
      ann = dict(ann)
      ann["category_id"] = AGNOSTIC_CATEGORY
      anns.append(ann)
  gt = coco_lib.COCO()
  gt.dataset = {
      "images": images,
      "annotations": anns,
      "categories": [{"id": AGNOSTIC_CATEGORY, "name": "object"}],
  }
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
  """[H, W] bool -> COCO RLE with an ASCII `counts` (JSON-serialisable)."""
  _, _, mask_lib = _pycocotools()
  rle = mask_lib.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def mask_box(rle: dict[str, Any]) -> list[float]:
  """[x, y, w, h] of an RLE mask (pycocotools' toBbox)."""
  _, _, mask_lib = _pycocotools()
  rle = dict(
      rle, counts=rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
  )
  return [float(v) for v in mask_lib.toBbox(rle)]


def _evaluate(gt, detections: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
  _, cocoeval, _ = _pycocotools()
  if not detections or not gt.getAnnIds():
    return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
  with contextlib.redirect_stdout(io.StringIO()):
    dt = gt.loadRes(copy.deepcopy(detections))
    ev = cocoeval.COCOeval(gt, dt, iou_type)
    ev.params.imgIds = sorted(gt.getImgIds())
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  # stats[0..2]: AP@[.5:.95], AP@.5, AP@.75 (area all, maxDets 100); -1 means undefined.
  return {name: max(float(ev.stats[i]), 0.0) for i, name in enumerate(("AP", "AP50", "AP75"))}


def class_agnostic_ap(
    gt, detections: Sequence[dict[str, Any]], iou_types: Sequence[str] = ("bbox", "segm")
) -> dict[str, float]:
  """AP, AP50, AP75 (fractions) of detections against a class-agnostic COCO.

  Args:
    gt: from agnostic_ground_truth.
    detections: dicts with 'image_id', 'score', 'bbox' [x, y, w, h] and/or 'segmentation'
      (RLE from encode_mask).
    iou_types: 'bbox' (keys 'box/...') and/or 'segm' (keys 'mask/...').

  Returns:
    {'box/AP', 'box/AP50', 'box/AP75', 'mask/AP', 'mask/AP50', 'mask/AP75'} as requested.
  """
  out = {}
  for iou_type in iou_types:
    field, prefix = {"bbox": ("bbox", "box"), "segm": ("segmentation", "mask")}[iou_type]
    dets = [
        {
            "image_id": int(d["image_id"]),
            "category_id": AGNOSTIC_CATEGORY,
            "score": float(d["score"]),
            field: d[field],
        }
        for d in detections
    ]
    out.update({f"{prefix}/{k}": v for k, v in _evaluate(gt, dets, iou_type).items()})
  return out
