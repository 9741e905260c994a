"""Tests for bits_jax.evaluate.maskcut and coco_ap (MaskCut, class-agnostic COCO AP)."""

import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import linalg, ndimage

from bits_jax.evaluate import coco_ap
from bits_jax.evaluate import maskcut
from bits_jax.evaluate import tfds_dense
from bits_jax.models import vit

needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocotools") is None,
    reason="COCO AP needs pycocotools (pip install pycocotools)",
)

_PATCH = 4


# ----------------------------------------------------------------------------- ViT keys


@pytest.mark.parametrize("remat", [False, True])
def test_last_block_keys_match_layernorm_then_key_projection(remat):
  model = vit.ViT(width=16, depth=2, num_heads=2, patch_size=_PATCH, image_size=16, remat=remat)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
  got = jax.jit(lambda v, x: maskcut.last_block_keys(model, v, x))(variables, images)
  assert got.shape == (2, 2 * 3, 16)
  np.testing.assert_allclose(got, jax.jit(_manual_keys)(variables["params"], images), atol=2e-5)


def _manual_keys(params, images):
  """Embedding, block0, then block1's norm1 (LayerNorm) and key projection; CLS dropped."""
  x = (
      jax.lax.conv_general_dilated(
          images,
          params["patch_embed"]["kernel"],
          (_PATCH, _PATCH),
          "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      + params["patch_embed"]["bias"]
  )
  x = x.reshape(2, 6, 16) + vit.resize_pos_embed(params["pos_embed"], (2, 3))
  x = jnp.concatenate([jnp.broadcast_to(params["cls_token"], (2, 1, 16)), x], axis=1)
  x = vit.EncoderBlock(num_heads=2).apply({"params": params["block0"]}, x)
  ln = params["block1"]["norm1"]
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
  y = y * ln["scale"] + ln["bias"]
  key = params["block1"]["attn"]["key"]
  keys = jnp.einsum("btd,dhk->bthk", y, key["kernel"]) + key["bias"]
  return keys[:, 1:].reshape(2, 6, 16)


def test_last_block_keys_needs_a_vit():
  class NotAViT:
    pass

  with pytest.raises(ValueError, match="ViT"):
    maskcut.last_block_keys(NotAViT(), {}, jnp.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------- NCut


def test_eigenvector_matches_scipy_generalized_eigh():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(30, 6)) + np.repeat(rng.normal(size=(3, 6)) * 2, 10, axis=0)
  w = np.asarray(maskcut.affinity(jnp.asarray(feats, jnp.float32), 0.15))
  d = np.diag(w.sum(1))
  _, vecs = linalg.eigh(d - w, d, subset_by_index=[1, 1])
  want = vecs[:, 0]
  got = np.asarray(maskcut.second_smallest_eigenvector(jnp.asarray(w)))
  got = got * np.sign(got @ want)
  np.testing.assert_allclose(got, want, atol=2e-3)


def test_component_of_matches_scipy_label():
  rng = np.random.default_rng(0)
  mask = rng.random((9, 11)) > 0.45
  labels, _ = ndimage.label(mask)  # 4-connectivity
  component = jax.jit(maskcut.component_of)
  for seed in np.flatnonzero(mask)[:10]:
    got = np.asarray(component(jnp.asarray(mask), seed))
    np.testing.assert_array_equal(got, labels.reshape(-1)[seed] == labels)


def _object_features(grid, objects, rng, noise=0.03):
  """Patch features: background ~ e0; object k ~ e_k + 0.6 e_last (objects alike)."""
  dim = len(objects) + 2
  feats = np.zeros(grid + (dim,))
  feats[..., 0] = 1.0
  for k, (r0, r1, c0, c1) in enumerate(objects):
    feats[r0:r1, c0:c1] = 0.0
    feats[r0:r1, c0:c1, k + 1] = 1.0
    feats[r0:r1, c0:c1, -1] = 0.6
  return (feats + noise * rng.normal(size=feats.shape)).reshape(-1, dim)


def _box_mask(grid, box):
  mask = np.zeros(grid, bool)
  mask[box[0] : box[1], box[2] : box[3]] = True
  return mask


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize(
    "objects",
    [
        [(3, 8, 4, 10)],
        [(2, 6, 2, 7), (7, 11, 6, 10)],
    ],
)
def test_maskcut_recovers_the_objects(objects):
  grid = (12, 12)
  feats = _object_features(grid, objects, np.random.default_rng(0))
  masks = np.asarray(maskcut.batch_masks(jnp.asarray(feats[None], jnp.float32), grid=grid))[0]
  assert masks.shape == (3, 12, 12)
  for box in objects:
    best = max(_iou(m, _box_mask(grid, box)) for m in masks)
    assert best > 0.8, (box, [m.sum() for m in masks])
  # Masks never overlap: later masks lose the patches of earlier ones.
  assert masks.sum(0).max() <= 1


def test_random_features_do_not_find_the_object():
  grid = (12, 12)
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(1, 144, 8)), jnp.float32)
  masks = np.asarray(maskcut.batch_masks(feats, grid=grid))[0]
  target = _box_mask(grid, (3, 8, 4, 10))
  assert max(_iou(m, target) for m in masks) < 0.5


# ----------------------------------------------------------------------------- COCO AP


def _coco(boxes_per_image, size=(40, 50)):
  """Instances json with rectangle objects (polygon segmentations)."""
  images, anns = [], []
  for image_id, boxes in enumerate(boxes_per_image, start=1):
    images.append(
        {"id": image_id, "file_name": f"{image_id:06d}.png", "height": size[0], "width": size[1]}
    )
    for x, y, w, h in boxes:
      anns.append({
          "id": len(anns) + 1,
          "image_id": image_id,
          "category_id": 7 + len(anns),
          "bbox": [x, y, w, h],
          "area": w * h,
          "iscrowd": 0,
          "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
      })
  return {
      "images": images,
      "annotations": anns,
      "categories": [{"id": 7 + i, "name": f"c{i}"} for i in range(len(anns))],
  }


def _detection(image_id, box, size=(40, 50), score=1.0):
  x, y, w, h = box
  mask = np.zeros(size, bool)
  mask[y : y + h, x : x + w] = True
  rle = coco_ap.encode_mask(mask)
  return {"image_id": image_id, "score": score, "bbox": coco_ap.mask_box(rle), "segmentation": rle}


@needs_coco
def test_mask_box_is_the_rectangle():
  assert _detection(1, (5, 3, 10, 7))["bbox"] == [5.0, 3.0, 10.0, 7.0]


@needs_coco
def test_perfect_detections_score_one():
  boxes = [[(2, 3, 20, 15), (30, 20, 12, 14)], [(10, 10, 25, 20)]]
  gt = coco_ap.agnostic_ground_truth(_coco(boxes))
  dets = [_detection(i, b) for i, bs in enumerate(boxes, start=1) for b in bs]
  got = coco_ap.class_agnostic_ap(gt, dets)
  for key in ("box/AP", "box/AP50", "box/AP75", "mask/AP", "mask/AP50", "mask/AP75"):
    assert got[key] == pytest.approx(1.0), got


@needs_coco
def test_partial_detections_match_coco_interpolation():
  # One of two objects found exactly: precision 1 up to recall 0.5 -> 51 of 101 points.
  gt = coco_ap.agnostic_ground_truth(_coco([[(2, 3, 20, 15), (30, 20, 12, 14)]]))
  got = coco_ap.class_agnostic_ap(gt, [_detection(1, (2, 3, 20, 15))])
  assert got["box/AP"] == pytest.approx(51 / 101)
  assert got["mask/AP50"] == pytest.approx(51 / 101)
  # One object found with IoU 0.64: a match at IoU thresholds 0.50, 0.55, 0.60 only.
  gt = coco_ap.agnostic_ground_truth(_coco([[(0, 0, 10, 25)]]))
  got = coco_ap.class_agnostic_ap(gt, [_detection(1, (0, 0, 10, 16))])
  assert got["box/AP50"] == pytest.approx(1.0) and got["box/AP75"] == 0.0
  assert got["box/AP"] == pytest.approx(0.3)
  assert got["mask/AP"] == pytest.approx(0.3)


@needs_coco
def test_ground_truth_keeps_only_the_evaluated_images():
  gt = coco_ap.agnostic_ground_truth(_coco([[(2, 3, 20, 15)], [(10, 10, 25, 20)]]), [1])
  assert gt.getImgIds() == [1] and len(gt.getAnnIds()) == 1
  got = coco_ap.class_agnostic_ap(gt, [_detection(1, (2, 3, 20, 15))])
  assert got["box/AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- end to end

_OBJECT_BOXES = [[(8, 6, 16, 18), (40, 24, 16, 18)], [(16, 12, 32, 24)]]  # x, y, w, h


class _Ctx:
  """EvalContext stand-in whose 'last_keys' are designed colour features of each patch."""

  def __init__(self, out_dir=None):
    self.out_dir = out_dir
    self.patch_size = _PATCH
    self.plots = []

  def normalize(self, images):
    return np.asarray(images, np.float32) / 255.0

  def predict(self, images, outputs=("cls",)):
    assert outputs == ("last_keys",)
    n, h, w, _ = images.shape
    c = images.reshape(n, h // _PATCH, _PATCH, w // _PATCH, _PATCH, 3).mean(axis=(2, 4))
    r, g, b = (np.maximum(c[..., i] - 0.16, 0) for i in range(3))
    feats = np.stack([g, r, b, 0.6 * (r + b)], axis=-1)  # objects alike, unlike background
    return {"last_keys": feats.reshape(n, -1, 4).astype(np.float32)}

  def add_plot(self, path):
    self.plots.append(path)


def _write_coco(root):
  """48 x 64 images; objects on multiples of 6 rows / 8 columns land on 32px patch borders."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "val"), exist_ok=True)
  data = _coco(_OBJECT_BOXES, size=(48, 64))
  for info, boxes in zip(data["images"], _OBJECT_BOXES):
    image = np.zeros((48, 64, 3), np.float32) + (40, 150, 40)
    for k, (x, y, w, h) in enumerate(boxes):
      image[y : y + h, x : x + w] = (210, 40, 40) if k == 0 else (40, 40, 210)
    image += rng.uniform(-20, 20, size=image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(root, "val", info["file_name"])
    )
  path = os.path.join(root, "instances.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  return path


@needs_coco
def test_run_detects_the_objects(tmp_path):
  annotations = _write_coco(str(tmp_path))
  ctx = _Ctx(out_dir=str(tmp_path / "out"))
  got = maskcut.run(
      ctx,
      images_dir=str(tmp_path / "val"),
      annotations=annotations,
      image_size=32,
      batch_size=4,
      save_examples=1,
  )
  for key in ("box/AP50", "box/AP75", "mask/AP50", "mask/AP75"):
    assert got[key] == pytest.approx(1.0), got
  assert got["num_images"] == 2 and 1 <= got["masks_per_image"] <= 3
  assert len(ctx.plots) == 1 and os.path.isfile(ctx.plots[0])


def test_missing_image_is_named(tmp_path):
  annotations = _write_coco(str(tmp_path))
  missing = os.path.join(str(tmp_path), "val", "000002.png")
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=missing):
    maskcut.run(_Ctx(), images_dir=str(tmp_path / "val"), annotations=annotations, image_size=32)
  with pytest.raises(ValueError, match="needs images_dir"):
    maskcut.run(_Ctx(), annotations=annotations)


# ----------------------------------------------------------------------------- TFDS coco


def _write_coco_tfds_sources(root):
  """The layouts the TFDS coco builder reads, for the images of _write_coco: val2017/,
  annotations/instances_val2017.json (80 categories) and, for 2017_panoptic,
  annotations/panoptic_val2017.json (80 things then 53 stuff) with its segment-id PNGs."""
  _write_coco(root)
  os.rename(os.path.join(root, "val"), os.path.join(root, "val2017"))
  with open(os.path.join(root, "instances.json"), encoding="utf-8") as f:
    data = json.load(f)
  for k, ann in enumerate(data["annotations"]):
    ann["category_id"] = k + 1
  data["categories"] = [{"id": i + 1, "name": f"thing{i}"} for i in range(80)]
  os.makedirs(os.path.join(root, "annotations"))
  with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
    json.dump(data, f)
  panoptic_dir = os.path.join(root, "panoptic_val2017")
  os.makedirs(panoptic_dir)
  categories = data["categories"] + [{"id": 101 + i, "name": f"stuff{i}"} for i in range(53)]
  panoptic = {"images": data["images"], "categories": categories, "annotations": []}
  for info in data["images"]:
    ids = np.full((48, 64), 300, np.int64)  # background: one stuff segment, id 300 = (44, 1, 0)
    segments = [{"id": 300, "category_id": 101, "area": 0, "bbox": [0, 0, 64, 48], "iscrowd": 0}]
    for ann in (a for a in data["annotations"] if a["image_id"] == info["id"]):
      x, y, w, h = ann["bbox"]
      ids[y : y + h, x : x + w] = ann["id"]
      segments.append({
          "id": ann["id"],
          "category_id": ann["category_id"],
          "area": w * h,
          "bbox": ann["bbox"],
          "iscrowd": 0,
      })
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)
    name = info["file_name"]
    Image.fromarray(rgb).save(os.path.join(panoptic_dir, name))
    panoptic["annotations"].append(
        {"file_name": name, "image_id": info["id"], "segments_info": segments}
    )
  with open(os.path.join(root, "annotations", "panoptic_val2017.json"), "w") as f:
    json.dump(panoptic, f)
  return panoptic_dir


@pytest.fixture(scope="module")
def tfds_coco(tmp_path_factory):
  """(directory root, TFDS data_dir) with `coco/2017` and `coco/2017_panoptic` prepared
  offline by the real builder (its own _generate_examples; the download skipped)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.object_detection import coco as coco_lib  # pylint: disable=g-import-not-at-top

  root = str(tmp_path_factory.mktemp("coco_dir"))
  panoptic_dir = _write_coco_tfds_sources(root)

  class OfflineCoco(coco_lib.Coco, skip_registration=True):
    name = "coco"

    def _split_generators(self, dl_manager):
      del dl_manager
      panoptic = self.builder_config.has_panoptic
      kind = coco_lib.AnnotationType.PANOPTIC if panoptic else coco_lib.AnnotationType.BBOXES
      return {
          "validation": self._generate_examples(
              root, root, "val2017", kind, panoptic_dir if panoptic else None
          )
      }

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for config in ("2017", "2017_panoptic"):
    OfflineCoco(config=config, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return root, data_dir


_RUN = dict(image_size=32, batch_size=4, save_examples=1)


@needs_coco
def test_tfds_coco_boxes_score_as_the_directory(tfds_coco, tmp_path):
  root, data_dir = tfds_coco
  want = maskcut.run(
      _Ctx(),
      images_dir=os.path.join(root, "val2017"),
      annotations=os.path.join(root, "annotations", "instances_val2017.json"),
      **_RUN,
  )
  ctx = _Ctx(out_dir=str(tmp_path))
  got = maskcut.run(ctx, tfds_name="coco/2017", tfds_data_dir=data_dir, **_RUN)
  assert {k: v for k, v in got.items() if k.startswith("box/")} == {
      k: v for k, v in want.items() if k.startswith("box/")
  }
  assert got["box/AP50"] == pytest.approx(1.0)
  assert not any(k.startswith("mask/") for k in got), got  # coco/2017 has no masks
  assert got["mask_ground_truth"] == "none (boxes only)"
  assert got["num_images"] == 2 and got["masks_per_image"] == want["masks_per_image"]
  assert len(ctx.plots) == 1 and os.path.isfile(ctx.plots[0])


@needs_coco
def test_tfds_coco_panoptic_gives_mask_ap(tfds_coco):
  _, data_dir = tfds_coco
  got = maskcut.run(_Ctx(), tfds_name="coco/2017_panoptic", tfds_data_dir=data_dir, **_RUN)
  for key in ("box/AP50", "box/AP75", "mask/AP50", "mask/AP75"):
    assert got[key] == pytest.approx(1.0), got
  assert got["mask_ground_truth"] == "TFDS coco/2017_panoptic panoptic things"


@needs_coco
def test_tfds_coco_unprepared_builder_says_how(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="tfds build coco/2017 .*or pass images_dir="):
    maskcut.run(_Ctx(), tfds_name="coco/2017", tfds_data_dir=str(tmp_path), image_size=32)


@needs_coco
def test_coco_ground_truth_from_a_tfds_example():
  ids = np.zeros((10, 20), np.int64)
  ids[2:6, 4:12] = 7  # thing
  ids[6:, :] = 300  # stuff
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format="PNG")
  objects = {
      "id": np.array([7, 300]),
      "area": np.array([32, 80]),
      "bbox": np.array([[0.2, 0.2, 0.6, 0.6], [0.6, 0.0, 1.0, 1.0]], np.float32),
      "label": np.array([3, 90]),
      "is_crowd": np.array([True, False]),
  }
  example = {"image/id": np.int64(5), "image/filename": b"5.jpg", "objects": objects}
  info, anns = tfds_dense.coco_ground_truth(example, 10, 20, "record")
  assert info == {"id": 5, "file_name": "5.jpg", "height": 10, "width": 20}
  assert len(anns) == 2 and "segmentation" not in anns[0]
  np.testing.assert_allclose(anns[0]["bbox"], [4, 2, 8, 4], atol=1e-5)
  assert anns[0]["iscrowd"] == 1 and anns[1]["iscrowd"] == 0
  panoptic = {
      "image/id": np.int64(5),
      "image/filename": b"5.jpg",
      "panoptic_objects": objects,
      "panoptic_image": buffer.getvalue(),
  }
  _, anns = tfds_dense.coco_ground_truth(panoptic, 10, 20, "record")
  assert len(anns) == 1  # the stuff segment (label 90 >= 80) is dropped
  from pycocotools import mask as mask_lib  # pylint: disable=g-import-not-at-top

  np.testing.assert_array_equal(mask_lib.decode(anns[0]["segmentation"]), ids == 7)
  with pytest.raises(ValueError, match="record: panoptic_image is 10x20 but the image is 10x21"):
    tfds_dense.coco_ground_truth(panoptic, 10, 21, "record")
