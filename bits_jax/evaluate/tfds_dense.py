"""TFDS readers of the dense evaluations: DAVIS-2017 videos and COCO images with ground truth.

DAVIS: the builder `davis/480p` (features `video`: Sequence{`frames`: Image, `segmentations`:
Image [H, W, 1] of object ids}, `metadata`: {`num_frames`, `video_name`}; splits `train`,
`validation`). COCO: `coco/2017` (`image`, `image/id`, `image/filename`, `objects`:
Sequence{`id`, `area`, `bbox` (normalised ymin, xmin, ymax, xmax), `label`, `is_crowd`}) has
boxes only; `coco/2017_panoptic` (`panoptic_image`: PNG of segment ids R + 256 G + 256^2 B,
`panoptic_objects` with the same fields over 133 labels) also gives masks, of its thing
segments (labels 0..79: the panoptic categories list the 80 things first). Panoptic segments
do not overlap, unlike the instances json, so its mask AP is close to, not equal to, the
instances-json figure.

Builders must already be prepared: nothing here downloads. Images stay encoded
(tfds.decode.SkipDecoding) until PIL decodes them, as it decodes the files of the directory
layouts, so both sources give the same pixels.
"""

import io
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

_PANOPTIC_THINGS = 80  # panoptic labels [0, 80) are COCO's thing categories


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def prepared_builder(name: str, data_dir: Optional[str], alternative: str):
  """The TFDS builder `name`, which must be prepared in `data_dir` (None: TFDS's default).

  `alternative` says what to pass instead (in the error for an unprepared builder).
  """
  builder = _tfds().builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS {name} is not prepared in {builder.data_dir_root}: prepare it with "
        f"`tfds build {name} --data_dir={builder.data_dir_root}` (it downloads the dataset), "
        f"set tfds_data_dir to where it is prepared, or pass {alternative}."
    )
  return builder


def _split(builder, name: str, split: str) -> str:
  if split not in builder.info.splits:
    raise ValueError(f"TFDS {name} has no split {split!r}: use one of {list(builder.info.splits)}.")
  return split


def decode_image(data: bytes, what: str) -> Image.Image:
  """PIL image of encoded bytes; `what` names the record in errors."""
  if not data:
    raise ValueError(f"{what} is empty.")
  return Image.open(io.BytesIO(data))


# ----------------------------------------------------------------------------- DAVIS


def davis_sequences(
    name: str, split: str, data_dir: Optional[str], sequences: Optional[Sequence[str]] = None
) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
  """(video name, encoded frames [T], encoded annotations [T]) of a split, in TFDS order.

  `sequences`: only these videos; a name the split lacks is an error before any video is
  read.
  """
  tfds = _tfds()
  builder = prepared_builder(name, data_dir, "data_dir=<DAVIS-2017 root> (directory layout)")
  split = _split(builder, name, split)
  skip = tfds.decode.SkipDecoding()
  decoders = {"video": {"frames": skip, "segmentations": skip}}
  wanted = None
  if sequences is not None:
    names = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False).map(
        lambda ex: ex["metadata"]["video_name"]
    )
    available = [n.decode() for n in tfds.as_numpy(names)]
    for sequence in sequences:
      if sequence not in available:
        raise ValueError(
            f"unknown sequence {sequence!r}: TFDS {name} {split} has {sorted(available)}."
        )
    wanted = set(sequences)
  dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  for example in tfds.as_numpy(dataset):
    video = example["metadata"]["video_name"].decode()
    if wanted is None or video in wanted:
      yield video, list(example["video"]["frames"]), list(example["video"]["segmentations"])


# ----------------------------------------------------------------------------- COCO


def _pixel_box(bbox, height: int, width: int) -> list[float]:
  """TFDS BBox (ymin, xmin, ymax, xmax) in [0, 1] -> COCO [x, y, w, h] in pixels."""
  ymin, xmin, ymax, xmax = (float(v) for v in bbox)
  return [xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height]


def coco_ground_truth(
    example: dict[str, Any], height: int, width: int, what: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(image info, annotations) of one TFDS COCO example, as in an instances json.

  Annotations have 'bbox' (pixels), 'area', 'iscrowd', category 1 and, from a panoptic
  example, an RLE 'segmentation' of each thing segment (stuff segments are dropped). Their
  'id' is left for the caller to number (panoptic segment ids repeat across images).
  """
  from bits_jax.evaluate import coco_ap  # pylint: disable=g-import-not-at-top

  image_id = int(example["image/id"])
  info = {
      "id": image_id,
      "file_name": example["image/filename"].decode(),
      "height": int(height),
      "width": int(width),
  }
  panoptic = "panoptic_objects" in example
  objects = example["panoptic_objects" if panoptic else "objects"]
  segment_ids = None
  if panoptic:
    with decode_image(example["panoptic_image"], f"{what} panoptic_image") as image:
      rgb = np.asarray(image.convert("RGB")).astype(np.int64)
    if rgb.shape[:2] != (height, width):
      raise ValueError(
          f"{what}: panoptic_image is {rgb.shape[0]}x{rgb.shape[1]} but the image is "
          f"{height}x{width}."
      )
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
  annotations = []
  for k in range(len(objects["bbox"])):
    if panoptic and int(objects["label"][k]) >= _PANOPTIC_THINGS:
      continue
    ann = {
        "image_id": image_id,
        "category_id": coco_ap.AGNOSTIC_CATEGORY,
        "bbox": _pixel_box(objects["bbox"][k], height, width),
        "area": float(objects["area"][k]),
        "iscrowd": int(bool(objects["is_crowd"][k])),
    }
    if panoptic:
      ann["segmentation"] = coco_ap.encode_mask(segment_ids == int(objects["id"][k]))
    annotations.append(ann)
  return info, annotations


def coco_images(
    name: str, split: str, data_dir: Optional[str], max_images: Optional[int] = None
) -> Iterator[tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]]:
  """(image info, uint8 [H, W, 3] image, annotations) of a TFDS COCO split, in TFDS order.

  Annotation ids are numbered 1, 2, ... over the stream. `max_images`: the first records
  only (TFDS order, not the lowest image ids).
  """
  tfds = _tfds()
  builder = prepared_builder(
      name, data_dir, "images_dir=<COCO val2017/> and annotations=<instances_val2017.json>"
  )
  split = _split(builder, name, split)
  skip = tfds.decode.SkipDecoding()
  decoders = {"image": skip}
  if "panoptic_image" in builder.info.features:
    decoders["panoptic_image"] = skip
  dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  if max_images:
    dataset = dataset.take(max_images)
  next_id = 1
  for example in tfds.as_numpy(dataset):
    what = f"TFDS {name} {split} image {int(example['image/id'])}"
    with decode_image(example["image"], what) as image:
      rgb = np.asarray(image.convert("RGB"))
    info, annotations = coco_ground_truth(example, rgb.shape[0], rgb.shape[1], what)
    for ann in annotations:
      ann["id"] = next_id
      next_id += 1
    yield info, rgb, annotations


def has_masks(name: str, data_dir: Optional[str]) -> bool:
  """Whether the TFDS COCO builder `name` carries masks (only the panoptic config does)."""
  return "panoptic_image" in _tfds().builder(name, data_dir=data_dir).info.features
