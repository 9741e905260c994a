"""Per-example DINO-style multi-crop augmentation in stateless TensorFlow ops.

Every random draw is a `tf.random.stateless_*` op keyed by an explicit seed
(a [2] int tensor), so an augmented example is a pure function of its image and
seed. Views of one image share one decode: for JPEG bytes only the union of all
crop windows is decoded (`tf.io.decode_and_crop_jpeg`), other formats are
decoded in full.

Recipe per view (DINO, Caron et al. 2021): random resized crop (scale range
per view type, aspect ratio in [3/4, 4/3]) -> horizontal flip -> colour jitter
(brightness, contrast, saturation, hue in random order, with probability
`color_jitter_prob`) -> grayscale -> Gaussian blur (sigma in [0.1, 2] px) ->
solarize -> normalize. Saturation, hue and grayscale only act on 3-channel
images.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import tensorflow as tf

ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
BLUR_SIGMA_RANGE = (0.1, 2.0)
# Kernel half-width covering 3 sigma of the largest blur.
_BLUR_RADIUS = int(math.ceil(3 * BLUR_SIGMA_RANGE[1]))


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One augmented view: output size, crop-scale range and effect probabilities."""
  size: int
  scale: tuple
  blur_prob: float
  solarize_prob: float


@dataclasses.dataclass(frozen=True)
class ColorSpec:
  """Photometric augmentation and normalization shared by all views."""
  channels: int
  flip: bool = True
  color_jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  mean: tuple = (0.5,)
  std: tuple = (0.5,)
  resize_method: str = 'bicubic'


def view_specs(config) -> tuple[list[ViewSpec], list[ViewSpec]]:
  """(global views, local views) from the data config.

  The first global view is always blurred with blur_probs[0]; the other
  global views use blur_probs[1] and are solarized with solarize_prob; local
  views use blur_probs[2] and are never solarized.
  """
  blur_first, blur_second, blur_local = tuple(config.blur_probs)
  globals_ = [
      ViewSpec(size=int(config.global_crop_size), scale=tuple(config.global_crop_scale),
               blur_prob=blur_first if i == 0 else blur_second,
               solarize_prob=0.0 if i == 0 else float(config.solarize_prob))
      for i in range(int(config.num_global_crops))]
  locals_ = [
      ViewSpec(size=int(config.local_crop_size), scale=tuple(config.local_crop_scale),
               blur_prob=blur_local, solarize_prob=0.0)
      for _ in range(int(config.num_local_crops))]
  return globals_, locals_


def fold_seed(seed: tf.Tensor, data) -> tf.Tensor:
  """A new [2] seed deterministically derived from `seed` and an integer."""
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64))


def _uniform(seed: tf.Tensor, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, minval=low, maxval=high)


# ----------------------------------------------------------------------------
# Geometry.


def sample_crop_window(seed: tf.Tensor, image_hw: tf.Tensor, scale: Sequence[float],
                       ratio: Sequence[float] = ASPECT_RATIO_RANGE) -> tf.Tensor:
  """Random-resized-crop window [4] int32 (y, x, h, w) inside an image of image_hw.

  Falls back to the whole image when 10 attempts find no window that fits.
  """
  image_size = tf.concat([tf.cast(image_hw, tf.int32), [1]], axis=0)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(image_hw: tf.Tensor, crop_size: int, resize_size: int) -> tf.Tensor:
  """Window [4] (y, x, h, w) equal to 'resize shorter side to resize_size, then
  center crop crop_size', expressed in original-image pixels."""
  h, w = tf.cast(image_hw[0], tf.float32), tf.cast(image_hw[1], tf.float32)
  side = tf.round(tf.minimum(h, w) * crop_size / resize_size)
  side = tf.cast(tf.clip_by_value(side, 1.0, tf.minimum(h, w)), tf.int32)
  hi, wi = tf.cast(image_hw[0], tf.int32), tf.cast(image_hw[1], tf.int32)
  return tf.stack([(hi - side) // 2, (wi - side) // 2, side, side])


def _union_window(windows: tf.Tensor) -> tf.Tensor:
  """Smallest window [4] containing all of windows [v, 4]."""
  top = tf.reduce_min(windows[:, 0])
  left = tf.reduce_min(windows[:, 1])
  bottom = tf.reduce_max(windows[:, 0] + windows[:, 2])
  right = tf.reduce_max(windows[:, 1] + windows[:, 3])
  return tf.stack([top, left, bottom - top, right - left])


def decode_windows(encoded: tf.Tensor, windows_fn, channels: int):
  """Decodes the part of an encoded image covered by `windows_fn(image_hw)`.

  Returns (region [h', w', channels] uint8, windows [v, 4] relative to region).
  JPEGs are decoded only inside the union window (fused decode and crop).
  """

  def from_jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    windows = windows_fn(shape[:2])
    union = _union_window(windows)
    # libjpeg's fancy chroma upsampling treats the crop's left and right
    # edges as image edges, which changes the outermost decoded columns of
    # subsampled JPEGs; decode 2 more columns on each side.
    left = tf.maximum(union[1] - 2, 0)
    right = tf.minimum(union[1] + union[3] + 2, shape[1])
    union = tf.stack([union[0], left, union[2], right - left])
    region = tf.io.decode_and_crop_jpeg(encoded, union, channels=channels)
    offset = tf.stack([union[0], union[1], 0, 0])
    return region, windows - offset[None]

  def from_other():
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    return image, windows_fn(tf.shape(image)[:2])

  region, windows = tf.cond(tf.io.is_jpeg(encoded), from_jpeg, from_other)
  region.set_shape([None, None, channels])
  return region, windows


def crop_and_resize(image: tf.Tensor, window: tf.Tensor, size: int,
                    method: str) -> tf.Tensor:
  """image [h, w, c] uint8, window (y, x, h, w) -> [size, size, c] float32 in [0, 1]."""
  crop = image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
  resized = tf.image.resize(crop, [size, size], method=method, antialias=True)
  return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


# ----------------------------------------------------------------------------
# Photometric ops on float images [h, w, c] in [0, 1].


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """[h, w, 3] -> [h, w, 1] luma (ITU-R 601-2, as PIL and torchvision)."""
  return tf.image.rgb_to_grayscale(image)


def adjust_brightness(image, factor):
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  gray = _grayscale(image) if image.shape[-1] == 3 else image
  mean = tf.reduce_mean(gray)
  return tf.clip_by_value((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  gray = _grayscale(image)
  return tf.clip_by_value((image - gray) * factor + gray, 0.0, 1.0)


def adjust_hue(image, delta):
  return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, spec: ColorSpec) -> tf.Tensor:
  """torchvision-style ColorJitter: the four adjustments in a random order."""
  color = image.shape[-1] == 3
  seeds = [fold_seed(seed, i) for i in range(5)]

  def factor(s, strength):
    return _uniform(s, max(0.0, 1.0 - strength), 1.0 + strength)

  ops = [
      lambda x: adjust_brightness(x, factor(seeds[0], spec.brightness)),
      lambda x: adjust_contrast(x, factor(seeds[1], spec.contrast)),
  ]
  if color:
    ops += [
        lambda x: adjust_saturation(x, factor(seeds[2], spec.saturation)),
        lambda x: adjust_hue(x, _uniform(seeds[3], -spec.hue, spec.hue)),
    ]
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], seeds[4]))

  # A loop around one switch keeps the graph (and its tracing time) small.
  def body(i, x):
    x = tf.switch_case(order[i], [lambda op=op: op(x) for op in ops])
    return i + 1, tf.ensure_shape(x, image.shape)

  _, image = tf.while_loop(lambda i, _: i < len(ops), body, (tf.constant(0), image))
  return image


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur with reflect padding; image [h, w, c] float."""
  height, width, channels = image.shape
  # Symmetric padding needs pad <= size: tiny images get a shorter kernel.
  pad = min(_BLUR_RADIUS, height or _BLUR_RADIUS, width or _BLUR_RADIUS)
  offsets = tf.range(-pad, pad + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
  kernel /= tf.reduce_sum(kernel)
  x = image[None]
  x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode='SYMMETRIC')
  k_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  k_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  x = tf.nn.depthwise_conv2d(x, k_v, strides=[1, 1, 1, 1], padding='VALID')
  x = tf.nn.depthwise_conv2d(x, k_h, strides=[1, 1, 1, 1], padding='VALID')
  return x[0]


def solarize(image: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  return tf.where(image >= threshold, 1.0 - image, image)


def _maybe(seed, prob: float, fn, image):
  """Applies fn to image with probability prob (no graph branch when 0 or 1)."""
  if prob <= 0.0:
    return image
  if prob >= 1.0:
    return fn(image)
  return tf.cond(_uniform(seed) < prob, lambda: fn(image), lambda: image)


def normalize(image: tf.Tensor, spec: ColorSpec) -> tf.Tensor:
  mean = tf.constant(spec.mean, tf.float32)
  std = tf.constant(spec.std, tf.float32)
  return (image - mean) / std


def photometric(image: tf.Tensor, seed: tf.Tensor, view: ViewSpec,
                spec: ColorSpec) -> tf.Tensor:
  """Flip, colour jitter, grayscale, blur, solarize of a [s, s, c] image in [0, 1]."""
  seeds = [fold_seed(seed, i) for i in range(7)]
  if spec.flip:
    image = tf.cond(_uniform(seeds[0]) < 0.5, lambda: image[:, ::-1], lambda: image)
  if spec.color_jitter_prob > 0 and (spec.brightness or spec.contrast or spec.saturation
                                     or spec.hue):
    image = _maybe(seeds[1], spec.color_jitter_prob,
                   lambda x: color_jitter(x, seeds[2], spec), image)
  if image.shape[-1] == 3:
    image = _maybe(seeds[3], spec.grayscale_prob,
                   lambda x: tf.tile(_grayscale(x), [1, 1, 3]), image)
  image = _maybe(seeds[4], view.blur_prob,
                 lambda x: gaussian_blur(x, _uniform(seeds[5], *BLUR_SIGMA_RANGE)), image)
  image = _maybe(seeds[6], view.solarize_prob, solarize, image)
  return image


# ----------------------------------------------------------------------------
# Whole examples.


def multicrop(image: tf.Tensor, seed: tf.Tensor, views: Sequence[ViewSpec],
              spec: ColorSpec, *, encoded: bool) -> list[tf.Tensor]:
  """All augmented views of one image.

  Args:
    image: decoded [h, w, c] uint8, or a scalar string of encoded bytes when
      `encoded` (PNG, JPEG, GIF, BMP; JPEG uses fused decode-and-crop).
    seed: [2] int seed of this example.
    views: one ViewSpec per output view.
    spec: photometric settings.
    encoded: whether `image` holds encoded bytes.
  Returns:
    One normalized float32 [size, size, c] tensor per view.
  """
  view_seeds = [fold_seed(seed, i) for i in range(len(views))]

  def windows_fn(image_hw):
    return tf.stack([sample_crop_window(fold_seed(s, 0), image_hw, v.scale)
                     for s, v in zip(view_seeds, views)])

  if encoded:
    region, windows = decode_windows(image, windows_fn, spec.channels)
  else:
    region, windows = image, windows_fn(tf.shape(image)[:2])
  outputs = []
  for i, (view, view_seed) in enumerate(zip(views, view_seeds)):
    x = crop_and_resize(region, windows[i], view.size, spec.resize_method)
    x.set_shape([view.size, view.size, spec.channels])
    x = photometric(x, fold_seed(view_seed, 1), view, spec)
    outputs.append(normalize(x, spec))
  return outputs


def eval_view(image: tf.Tensor, crop_size: int, resize_size: int, spec: ColorSpec, *,
              encoded: bool) -> tf.Tensor:
  """Resize shorter side to resize_size, center crop crop_size, normalize.

  Computed as one crop in original pixels followed by one resize (and, for
  JPEG, a fused decode of that crop only). Returns [crop, crop, c] float32.
  """

  def windows_fn(image_hw):
    return center_crop_window(image_hw, crop_size, resize_size)[None]

  if encoded:
    region, windows = decode_windows(image, windows_fn, spec.channels)
  else:
    region, windows = image, windows_fn(tf.shape(image)[:2])
  x = crop_and_resize(region, windows[0], crop_size, spec.resize_method)
  x.set_shape([crop_size, crop_size, spec.channels])
  return normalize(x, spec)


def default_eval_resize(crop_size: int, resize_size: Optional[int] = None) -> int:
  """ImageNet convention (256 for 224) for >= 64 px crops, no margin below."""
  if resize_size:
    return int(resize_size)
  return int(round(crop_size * 8 / 7)) if crop_size >= 64 else int(crop_size)
