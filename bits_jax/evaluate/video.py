"""DAVIS-2017 semi-supervised video object segmentation by label propagation (DINO's protocol).

Each frame is resized so that its short side is `resize` pixels (default: its own) and its
long side is rounded down to a multiple of 64; its features are the backbone's patch tokens,
L2-normalised. The first frame's annotation, resized (nearest) to the patch grid, is one-hot
over the object ids. Every later frame takes, for each patch, the top-k most similar patches
among the first frame and the n previous frames, restricted to a (2r+1) x (2r+1) window
around the patch (r = `neighborhood`), weighted by exp(cos / temperature) normalised to sum 1
over those k; its soft labels are these weights times the sources' soft labels (the first
frame's one-hot, the previous frames' own propagated labels). Labels are upsampled
(bilinear) to the resized frame, min-max normalised per object, arg-maxed and resized
(nearest) back to the annotation size; J and F are scored with `davis_metrics` as the
official toolkit does.

Data: a directory in DAVIS layout, `JPEGImages/480p/<seq>/*.jpg`, `Annotations/480p/<seq>/
*.png` (palette PNGs of object ids, one per frame) and `ImageSets/2017/<split>.txt`; or the
TFDS builder `davis/480p` (`tfds_name`, see `tfds_dense.davis_sequences`), whose frames stay
encoded until they are read. Frames are decoded one batch at a time; only the n + 1 context
frames' features stay in memory.
"""

import dataclasses
import functools
import io
import math
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bits_jax import utils
from bits_jax.evaluate import common
from bits_jax.evaluate import davis_metrics
from bits_jax.evaluate import tfds_dense

# The paper's rows as ../shared/PAPER.md states them: {method: {metric: value}}, metric names
# as in our results, values as the paper prints them (percent; our results are fractions).
# Tab. 7: DAVIS-2017 val, DINO's label propagation, ViT-B/16 pre-trained 100 epochs on IN-1k.
paper_table = "Tab. 7: DAVIS-2017 val, semi-supervised VOS by DINO's label propagation"
paper_reference = {"BITS-fixed": {"JF_mean": 62.78}}

VOID_LABEL = 255  # DAVIS "void"; the toolkit scores it as background
_PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 190],
    ],
    np.uint8,
)


# ----------------------------------------------------------------------------- geometry


def frame_size(
    height: int,
    width: int,
    *,
    patch_size: int,
    short_side: Optional[int] = None,
    round_to: int = 64,
) -> tuple[int, int]:
  """(th, tw) the network sees: short side -> short_side, long side scaled and rounded down
  to a multiple of `round_to` (DINO: short side 480, multiple 64; a square frame counts as
  landscape)."""
  short = short_side or min(height, width)
  if short % patch_size or round_to % patch_size:
    raise ValueError(
        f"resize={short} and round_to={round_to} must be multiples of the patch "
        f"size {patch_size}: pick a short side such as 480."
    )
  if height > width:
    th, tw = int(short * height / width) // round_to * round_to, short
  else:
    th, tw = short, int(short * width / height) // round_to * round_to
  if th < patch_size or tw < patch_size:
    raise ValueError(
        f"frame {height}x{width} resized to {th}x{tw}: the long side rounded to "
        f"a multiple of round_to={round_to} is empty; lower round_to."
    )
  return th, tw


def nearest_index(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output pixel of a nearest resize (pixel centres, as PIL)."""
  return np.minimum(
      ((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1
  )


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W] -> [size[0], size[1]] by nearest neighbour."""
  rows = nearest_index(labels.shape[0], size[0])
  cols = nearest_index(labels.shape[1], size[1])
  return labels[rows[:, None], cols[None, :]]


def _linear_taps(size_in: int, size_out: int):
  """Left index, right index and right weight of each output pixel (half-pixel centres)."""
  x = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
  left = np.floor(x).astype(np.int64)
  return left, np.minimum(left + 1, size_in - 1), (x - left).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, C] -> [size[0], size[1], C], plain bilinear without antialiasing (the
  interpolation of OpenCV's INTER_LINEAR, which DINO's reader uses)."""
  if image.shape[:2] == tuple(size):
    return image
  top, bottom, wy = _linear_taps(image.shape[0], size[0])
  left, right, wx = _linear_taps(image.shape[1], size[1])
  x = image.astype(np.float32)
  x = x[top] * (1 - wy)[:, None, None] + x[bottom] * wy[:, None, None]
  x = x[:, left] * (1 - wx)[None, :, None] + x[:, right] * wx[None, :, None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def one_hot_grid(mask: np.ndarray, grid: tuple[int, int], num_labels: int) -> np.ndarray:
  """Annotation [H, W] int -> [h * w, num_labels] float32 one-hot on the patch grid."""
  small = resize_nearest(mask, grid).reshape(-1)
  return np.eye(num_labels, dtype=np.float32)[small]


# ----------------------------------------------------------------------------- propagation


def _window(grid: tuple[int, int], radius: int, queries: jax.Array) -> jax.Array:
  """[q, h * w] bool: source patches within the (2r+1)^2 window of each query patch."""
  w = grid[1]
  sources = jnp.arange(grid[0] * grid[1])
  d_row = jnp.abs(queries[:, None] // w - sources[None, :] // w)
  d_col = jnp.abs(queries[:, None] % w - sources[None, :] % w)
  return (d_row <= radius) & (d_col <= radius)


def propagate_labels(
    target,
    feats,
    labels,
    valid,
    *,
    grid: tuple[int, int],
    topk: int,
    neighborhood: int,
    temperature: float,
    block: int = 1024,
) -> jax.Array:
  """Soft labels of the target frame from the context frames.

  Args:
    target: [h * w, D] L2-normalised patch features of the target frame.
    feats: [m, h * w, D] L2-normalised features of the m context slots.
    labels: [m, h * w, C] their soft labels.
    valid: [m] bool; invalid slots are never sources.
    grid: (h, w) patch grid.
    topk: sources kept per target patch (ties with the k-th are kept too).
    neighborhood: window radius in patches; <= 0: whole frame.
    temperature: source weight exp(cos / temperature) before normalisation.
    block: target patches per similarity block (bounds memory to block x m*h*w).

  Returns:
    [h * w, C] float32 soft labels (each row sums to 1).
  """
  target, feats, labels = jnp.asarray(target), jnp.asarray(feats), jnp.asarray(labels)
  valid = jnp.asarray(valid, bool)
  m, n, dim = feats.shape
  num_labels = labels.shape[-1]
  src = feats.reshape(m * n, dim)
  src_labels = labels.reshape(m * n, num_labels)
  n_blocks = math.ceil(n / block)
  block = math.ceil(n / n_blocks)  # equal blocks, little padding
  index = jnp.minimum(jnp.arange(n_blocks * block), n - 1).reshape(n_blocks, block)

  def one_block(queries):
    sims = jnp.matmul(target[queries], src.T, precision=jax.lax.Precision.HIGHEST)
    aff = jnp.exp(sims.reshape(block, m, n) / temperature)
    keep = jnp.broadcast_to(valid[None, :, None], aff.shape)
    if neighborhood > 0:
      keep = keep & _window(grid, neighborhood, queries)[:, None, :]
    aff = jnp.where(keep, aff, 0.0).reshape(block, m * n)
    # min over all k values: slicing out only the k-th lets XLA:CPU rewrite top_k to a sort.
    kth = jax.lax.top_k(aff, topk)[0].min(axis=-1, keepdims=True)
    weights = jnp.where(aff >= kth, aff, 0.0)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    return jnp.matmul(weights, src_labels, precision=jax.lax.Precision.HIGHEST)

  out = jax.lax.map(one_block, index).reshape(n_blocks * block, num_labels)
  return out[:n]


def upsample_argmax(labels, *, grid: tuple[int, int], size: tuple[int, int], rows, cols):
  """Soft labels [h * w, C] -> label map [len(rows), len(cols)] int32.

  Bilinear upsampling to `size` (half-pixel centres), per-label min-max normalisation (a
  label whose maximum is 0 is left as is), arg-max, then nearest resampling by the index
  arrays `rows`, `cols` (into `size`).
  """
  up = jax.image.resize(
      labels.reshape(grid[0], grid[1], -1), (size[0], size[1], labels.shape[-1]), "bilinear"
  )
  lo, hi = up.min(axis=(0, 1)), up.max(axis=(0, 1))
  scaled = (up - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  up = jnp.where(hi > 0, jnp.where(hi > lo, scaled, 0.0), up)
  seg = jnp.argmax(up, axis=-1).astype(jnp.int32)
  return seg[rows[:, None], cols[None, :]]


@functools.partial(
    jax.jit,
    static_argnames=("grid", "size", "topk", "neighborhood", "temperature", "store"),
    donate_argnums=(0, 1, 2),
)
def _step(
    feats,
    labels,
    valid,
    target,
    slot,
    rows,
    cols,
    *,
    grid,
    size,
    topk,
    neighborhood,
    temperature,
    store,
):
  """One frame: propagate, store it in context slot `slot`, and segment it."""
  target = utils.l2_normalize(target.astype(jnp.float32))
  soft = propagate_labels(
      target,
      feats,
      labels,
      valid,
      grid=grid,
      topk=topk,
      neighborhood=neighborhood,
      temperature=temperature,
  )
  if store:
    feats = feats.at[slot].set(target)
    labels = labels.at[slot].set(soft)
    valid = valid.at[slot].set(True)
  seg = upsample_argmax(soft, grid=grid, size=size, rows=rows, cols=cols)
  return feats, labels, valid, seg


FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 [b, th, tw, 3] -> [b, h * w, D]


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
  batch = []
  for frame in frames:
    batch.append(frame)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def segment_video(
    frames: Iterable[np.ndarray],
    first_mask: np.ndarray,
    features_fn: FeatureFn,
    *,
    patch_size: int,
    n_last_frames: int = 7,
    topk: int = 5,
    neighborhood: int = 12,
    temperature: float = 0.1,
    resize: Optional[int] = None,
    round_to: int = 64,
    batch_frames: int = 4,
) -> Iterator[np.ndarray]:
  """Propagates the first frame's labels through a video.

  Args:
    frames: uint8 [H, W, 3] frames, the first one included (read lazily).
    first_mask: [H, W] int object ids of the first frame (0 = background).
    features_fn: uint8 frames [b, th, tw, 3] -> patch features [b, h * w, D].
    patch_size: stride of the patch features.
    n_last_frames, topk, neighborhood, temperature: the propagation (see module doc).
    resize, round_to: frame geometry (see frame_size).
    batch_frames: frames per features_fn call (padded, so one shape is compiled).

  Yields:
    [H, W] int32 predicted object ids of frames 1, 2, ... (not the first).
  """
  if topk < 1 or n_last_frames < 0 or temperature <= 0:
    raise ValueError(
        f"need topk >= 1, n_last_frames >= 0, temperature > 0; got {topk}, "
        f"{n_last_frames}, {temperature}."
    )
  first_mask = np.asarray(first_mask)
  height, width = first_mask.shape
  size = frame_size(height, width, patch_size=patch_size, short_side=resize, round_to=round_to)
  grid = (size[0] // patch_size, size[1] // patch_size)
  num_labels = int(first_mask.max()) + 1
  num_labels_padded = 4 * math.ceil(num_labels / 4)  # fewer compilations across sequences
  rows = jnp.asarray(nearest_index(size[0], height))
  cols = jnp.asarray(nearest_index(size[1], width))
  slots = 1 + n_last_frames
  feats = labels = valid = None
  t = 0
  for batch in _batches(frames, batch_frames):
    resized = []
    for frame in batch:
      if frame.shape[:2] != (height, width):
        raise ValueError(
            f"frame {t + len(resized)} is {frame.shape[:2]}, the first mask "
            f"{(height, width)}: all frames must match the annotation size."
        )
      resized.append(resize_bilinear(frame, size))
    padded = np.stack(resized + [resized[-1]] * (batch_frames - len(resized)))
    tokens = np.asarray(features_fn(padded))
    if tokens.ndim != 3 or tokens.shape[:2] != (batch_frames, grid[0] * grid[1]):
      raise ValueError(
          f"features_fn returned {tokens.shape} for frames {padded.shape}: "
          f"expected [{batch_frames}, {grid[0] * grid[1]}, D] patch tokens of "
          f"stride {patch_size}."
      )
    for i in range(len(batch)):
      if t == 0:
        first = utils.l2_normalize(jnp.asarray(tokens[0], jnp.float32))
        feats = jnp.zeros((slots,) + first.shape, jnp.float32).at[0].set(first)
        labels = jnp.zeros((slots, first.shape[0], num_labels_padded), jnp.float32)
        labels = labels.at[0, :, :num_labels].set(one_hot_grid(first_mask, grid, num_labels))
        valid = jnp.zeros((slots,), bool).at[0].set(True)
      else:
        slot = 1 + (t - 1) % n_last_frames if n_last_frames else 0
        feats, labels, valid, seg = _step(
            feats,
            labels,
            valid,
            jnp.asarray(tokens[i]),
            jnp.int32(slot),
            rows,
            cols,
            grid=grid,
            size=size,
            topk=int(topk),
            neighborhood=int(neighborhood),
            temperature=float(temperature),
            store=n_last_frames > 0,
        )
        yield np.asarray(seg)
      t += 1


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class VideoSequence:
  """One annotated video, read lazily.

  Attributes:
    name: the sequence name.
    frame_names: where each frame comes from (a path, or a TFDS record), for error messages.
    annotation_names: likewise for each frame's annotation.
    read_frame: t -> uint8 [H, W, 3].
    read_annotation: t -> int32 [H, W] object ids (void -> background).
  """

  name: str
  frame_names: Sequence[str]
  annotation_names: Sequence[str]
  read_frame: Callable[[int], np.ndarray]
  read_annotation: Callable[[int], np.ndarray]


def _imageset(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, "ImageSets", "2017", f"{split}.txt")


def list_sequences(
    data_dir: str,
    split: str = "val",
    sequences: Optional[Sequence[str]] = None,
    resolution: str = "480p",
) -> list[str]:
  """Sequence names: `sequences` (each must have a frame directory) or the split's list."""
  frames_root = os.path.join(data_dir, "JPEGImages", resolution)
  if sequences is None:
    path = _imageset(data_dir, split)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"DAVIS split list {path} not found: point data_dir at the "
          f"DAVIS-2017 root (with ImageSets/2017/{split}.txt)."
      )
    with open(path, encoding="utf-8") as f:
      sequences = [line.strip() for line in f if line.strip()]
  sequences = list(sequences)
  for name in sequences:
    if not os.path.isdir(os.path.join(frames_root, name)):
      raise ValueError(
          f"unknown sequence {name!r}: {os.path.join(frames_root, name)} does not "
          f"exist (names are listed in {_imageset(data_dir, split)})."
      )
  return sequences


def sequence_files(
    data_dir: str, name: str, resolution: str = "480p"
) -> tuple[list[str], list[str]]:
  """(frame paths, annotation paths) of a sequence, sorted; every frame needs an annotation."""
  frame_dir = os.path.join(data_dir, "JPEGImages", resolution, name)
  frames = sorted(f for f in os.listdir(frame_dir) if f.lower().endswith(".jpg"))
  if not frames:
    raise FileNotFoundError(f"no .jpg frames in {frame_dir}.")
  ann_dir = os.path.join(data_dir, "Annotations", resolution, name)
  annotations = [os.path.join(ann_dir, os.path.splitext(f)[0] + ".png") for f in frames]
  for path in annotations:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"missing annotation {path} for frame "
          f"{os.path.join(frame_dir, os.path.basename(path)[:-4])}.jpg."
      )
  return [os.path.join(frame_dir, f) for f in frames], annotations


def _rgb(image: Image.Image) -> np.ndarray:
  return np.asarray(image.convert("RGB"))


def _object_ids(image: Image.Image, name: str) -> np.ndarray:
  """[H, W] int32 ids of a palette / grayscale image; void (255) -> background."""
  if image.mode not in ("P", "L"):
    raise ValueError(
        f"annotation {name} has mode {image.mode}: DAVIS annotations are palette "
        "PNGs whose indices are object ids."
    )
  ids = np.asarray(image).astype(np.int32)
  return np.where(ids == VOID_LABEL, 0, ids)


def read_frame(path: str) -> np.ndarray:
  """uint8 [H, W, 3]."""
  with Image.open(path) as image:
    return _rgb(image)


def read_annotation(path: str) -> np.ndarray:
  """[H, W] int32 object ids of a palette (or grayscale) PNG; void (255) -> background."""
  with Image.open(path) as image:
    return _object_ids(image, path)


def directory_sequence(data_dir: str, name: str, resolution: str = "480p") -> VideoSequence:
  """A sequence of a directory in DAVIS layout (annotations checked to exist)."""
  frames, annotations = sequence_files(data_dir, name, resolution)
  return VideoSequence(
      name,
      frames,
      annotations,
      lambda t: read_frame(frames[t]),
      lambda t: read_annotation(annotations[t]),
  )


def encoded_sequence(
    name: str, frames: Sequence[bytes], annotations: Sequence[bytes], origin: str
) -> VideoSequence:
  """A sequence of encoded images (JPEG frames, PNG annotations), decoded one at a time.

  `origin` names the source in messages, e.g. 'TFDS davis/480p validation'.
  """
  if len(frames) != len(annotations):
    raise ValueError(
        f"{origin} video {name!r} has {len(frames)} frames but {len(annotations)} "
        "annotations: every frame needs one."
    )

  frame_names = [f"{origin} video {name!r} frame {t}" for t in range(len(frames))]
  annotation_names = [f"{origin} video {name!r} annotation {t}" for t in range(len(frames))]

  def decode(data: bytes, what: str):
    if not data:
      raise ValueError(f"{what} is empty.")
    return Image.open(io.BytesIO(data))

  def frame(t):
    with decode(frames[t], frame_names[t]) as image:
      return _rgb(image)

  def annotation(t):
    with decode(annotations[t], annotation_names[t]) as image:
      return _object_ids(image, annotation_names[t])

  return VideoSequence(name, frame_names, annotation_names, frame, annotation)


def overlay(frame: np.ndarray, seg: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 [H, W, 3] frame with object ids [H, W] painted over it."""
  colors = _PALETTE[np.asarray(seg) % len(_PALETTE)].astype(np.float32)
  out = np.where(
      np.asarray(seg)[..., None] > 0, (1 - alpha) * frame.astype(np.float32) + alpha * colors, frame
  )
  return out.astype(np.uint8)


def evaluate_sequence(
    sequence: VideoSequence,
    features_fn: FeatureFn,
    *,
    patch_size: int,
    example_path: Optional[str] = None,
    **propagation,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-object (J, F) means [K] of one sequence (first and last frame not scored).

  `example_path`: where to save the middle frame with its predicted masks (PNG).
  """
  first_mask = sequence.read_annotation(0)
  first_name = sequence.annotation_names[0]
  num_objects = int(first_mask.max())
  if num_objects == 0:
    raise ValueError(f"first annotation {first_name} has no object (all background).")

  n = len(sequence.frame_names)

  def frames():  # the last frame is not scored, so it is not propagated either
    for t in range(n - 1):
      frame = sequence.read_frame(t)
      if frame.shape[:2] != first_mask.shape:
        raise ValueError(
            f"frame {sequence.frame_names[t]} is {frame.shape[0]}x{frame.shape[1]} but "
            f"the first annotation {first_name} is {first_mask.shape[0]}x"
            f"{first_mask.shape[1]}: frames and masks must have one size."
        )
      yield frame

  j_frames, f_frames = [], []
  example_index = n // 2
  for t, seg in enumerate(
      segment_video(frames(), first_mask, features_fn, patch_size=patch_size, **propagation),
      start=1,
  ):
    gt = sequence.read_annotation(t)
    if gt.shape != seg.shape:
      raise ValueError(
          f"annotation {sequence.annotation_names[t]} is {gt.shape[0]}x{gt.shape[1]} but "
          f"frame {sequence.frame_names[t]} is {seg.shape[0]}x{seg.shape[1]}."
      )
    j, f = davis_metrics.frame_scores(seg, gt, num_objects)
    j_frames.append(j)
    f_frames.append(f)
    if example_path and t == example_index:
      Image.fromarray(overlay(sequence.read_frame(t), seg)).save(example_path)
  return davis_metrics.sequence_means(
      np.reshape(j_frames, (-1, num_objects)), np.reshape(f_frames, (-1, num_objects))
  )


def _sequences(
    data_dir, tfds_name, tfds_data_dir, split, sequences, resolution, max_sequences
) -> Iterator[VideoSequence]:
  """The sequences to score, from a DAVIS directory or a TFDS builder (unknown names fail
  before any is read)."""
  if tfds_name:
    tfds_split = {"val": "validation"}.get(split, split)
    stream = tfds_dense.davis_sequences(tfds_name, tfds_split, tfds_data_dir, sequences)
    for i, (name, frames, annotations) in enumerate(stream):
      if max_sequences and i >= max_sequences:
        return
      yield encoded_sequence(name, frames, annotations, origin=f"TFDS {tfds_name} {tfds_split}")
    return
  if not data_dir:
    raise common.MissingData(
        "the davis evaluator needs data_dir=<DAVIS-2017 root> (with JPEGImages/, "
        "Annotations/ and ImageSets/2017/) or tfds_name='davis/480p'."
    )
  names = list_sequences(data_dir, split, sequences, resolution)
  if max_sequences:
    names = names[:max_sequences]
  for name in names:
    yield directory_sequence(data_dir, name, resolution)


@common.register("davis")
def run(
    ctx,
    *,
    data_dir: Optional[str] = None,
    tfds_name: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    sequences: Optional[Sequence[str]] = None,
    n_last_frames: int = 7,
    topk: int = 5,
    neighborhood: int = 12,
    temperature: float = 0.1,
    resize: Optional[int] = None,
    round_to: int = 64,
    split: str = "val",
    resolution: str = "480p",
    batch_frames: int = 4,
    max_sequences: Optional[int] = None,
    save_examples: int = 2,
) -> dict:
  """DAVIS-2017 J, F and J&F means (fractions) over a split's sequences.

  Args:
    ctx: the EvalContext (its `patch_tokens`).
    data_dir: DAVIS-2017 root in directory layout (used when tfds_name is not set).
    tfds_name: a TFDS builder such as 'davis/480p', read from tfds_data_dir (None: TFDS's
      default); it must be prepared (`tfds build davis/480p`).
    sequences: names to score (default: the whole split).
    n_last_frames, topk, neighborhood, temperature: DINO's propagation (7, 5, 12, 0.1).
    resize, round_to: the frames' short side (None: their own, 480 for DAVIS 480p) and the
      multiple the long side is rounded down to.
    split: 'val' / 'train' (ImageSets/2017/<split>.txt; TFDS: 'validation' / 'train').
    resolution: the directory layout's resolution folder.
    batch_frames: frames per forward pass.
    max_sequences: score only the first sequences.
    save_examples: sequences whose middle frame is saved with its masks under out_dir/plots.

  Returns:
    {'J_mean', 'F_mean', 'JF_mean', 'num_sequences', 'seq/<name>/JF'}.
  """
  plot_dir = None
  if ctx.out_dir is not None and save_examples:
    plot_dir = os.path.join(ctx.out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)

  def features_fn(frames):
    return ctx.predict(ctx.normalize(frames), outputs=("patch_tokens",))["patch_tokens"]

  per_sequence = {}
  stream = _sequences(
      data_dir, tfds_name, tfds_data_dir, split, sequences, resolution, max_sequences
  )
  for i, sequence in enumerate(stream):
    example = None
    if plot_dir is not None and i < save_examples:
      example = os.path.join(plot_dir, f"davis_{sequence.name}.png")
    per_sequence[sequence.name] = evaluate_sequence(
        sequence,
        features_fn,
        patch_size=ctx.patch_size,
        example_path=example,
        n_last_frames=n_last_frames,
        topk=topk,
        neighborhood=neighborhood,
        temperature=temperature,
        resize=resize,
        round_to=round_to,
        batch_frames=batch_frames,
    )
    if example is not None and os.path.isfile(example):
      ctx.add_plot(example)
    j, f = per_sequence[sequence.name]
    logging.info("davis %s: J&F %.4f", sequence.name, float(np.nanmean((j + f) / 2)))
  results = davis_metrics.summarize(per_sequence)
  results["num_sequences"] = len(per_sequence)
  return results
