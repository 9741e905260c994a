"""Per-example DINO-style multi-crop augmentation in stateless TensorFlow ops.

Every random draw is a `tf.random.stateless_*` op keyed by an explicit seed
(a [2] int tensor), so an augmented example is a pure function of its image and
seed. Views of one image share one decode: for JPEG bytes only the union of all
crop windows is decoded (`tf.io.decode_and_crop_jpeg`), other formats are
decoded in full.

Recipe per view (DINO, Caron et al. 2021): random resized crop (scale range
per view type, aspect ratio in [3/4, 4/3]; windows drawn as torchvision's
RandomResizedCrop draws them, or as TF's inception crop) -> horizontal flip -> colour jitter
(brightness, contrast, saturation, hue in random order, with probability
`color_jitter_prob`) -> grayscale -> Gaussian blur (sigma in [0.1, 2] px) ->
solarize -> normalize. Saturation, hue and grayscale only act on 3-channel
images. Stored images of 1 or 3 channels are first converted to the model's
channel count (`convert_channels`: RGB -> luma, gray -> repeated).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import tensorflow as tf

ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# How random-resized-crop windows are drawn (`config.input.crops.window_sampler`); the first
# is the default.
WINDOW_SAMPLERS = ('torchvision', 'inception')
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
  window_sampler: str = WINDOW_SAMPLERS[0]


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
  resize_antialias: bool = False
  # XLA-compile the per-pixel ops it runs 2-3x faster than TF kernels on CPU
  # (hue, grayscale, normalize); depthwise blur is slower under XLA.
  xla: bool = True


# Per-dataset normalization statistics (on images scaled to [0, 1]).
KNOWN_NORMALIZATION = {
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'imagenet2012_subset': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'mnist': ((0.1307,), (0.3081,)),
}


def known_normalization(dataset: str) -> Optional[tuple]:
  """(mean, std) of KNOWN_NORMALIZATION for a TFDS name, also with a version or config.

  'imagenet2012:5.1.0' and 'imagenet2012_subset/10pct' have the stats of their base name.
  """
  name = str(dataset).split(':')[0]
  return KNOWN_NORMALIZATION.get(name, KNOWN_NORMALIZATION.get(name.split('/')[0]))


def is_area_range(pair) -> bool:
  """Whether `pair` is a (low, high) fraction of the image area: 0 < low <= high <= 1."""
  try:
    return len(pair) == 2 and 0 < pair[0] <= pair[1] <= 1
  except TypeError:  # not numbers, or not a sequence
    return False


def global_view_scales(crops) -> list[tuple[float, float]]:
  """(low, high) area range of each global view: `crops.global_view_scales` when set, else
  `crops.global_scale` for all.

  (1.0, 1.0) gives the whole image, or, from the torchvision sampler, its central crop at the
  nearest aspect ratio in [3/4, 4/3] when the image's own lies outside.
  """
  per_view = tuple(crops.get('global_view_scales', ()))
  try:
    per_view = tuple(tuple(float(v) for v in pair) for pair in per_view)
  except (TypeError, ValueError):
    raise ValueError(
        f'config.input.crops.global_view_scales={per_view}: give one (low, high) pair of '
        'numbers per global view, e.g. ((0.4, 1.0), (1.0, 1.0)).'
    ) from None
  num_global = int(crops.num_global)
  if not per_view:
    return [tuple(float(v) for v in crops.global_scale)] * num_global
  if len(per_view) != num_global:
    raise ValueError(
        f'config.input.crops.global_view_scales has {len(per_view)} (low, high) pairs for '
        f'num_global={num_global} global views: give one pair per view, or () to use '
        'global_scale for all.'
    )
  for pair in per_view:
    if not is_area_range(pair):
      raise ValueError(
          f'config.input.crops.global_view_scales={per_view}: each entry must be (low, high) '
          'with 0 < low <= high <= 1.'
      )
  return list(per_view)


def view_specs(input_config) -> tuple[list[ViewSpec], list[ViewSpec]]:
  """(global views, local views) from `config.input` (its `crops` and `augment`).

  The first global view is always blurred with blur_probs[0]; the other
  global views use blur_probs[1] and are solarized with solarize_prob; local
  views use blur_probs[2] and are never solarized.
  """
  crops, aug = input_config.crops, input_config.augment
  if len(tuple(aug.blur_probs)) != 3:
    raise ValueError(
        'config.input.augment.blur_probs must be (first global, other globals, '
        f'locals), got {aug.blur_probs}'
    )
  for key in ('global_size', 'local_size'):
    if int(crops[key]) <= 0:
      raise ValueError(f'config.input.crops.{key} must be a positive int, got {crops[key]}')
  sampler = str(crops.get('window_sampler', WINDOW_SAMPLERS[0]))
  if sampler not in WINDOW_SAMPLERS:
    raise ValueError(
        f'config.input.crops.window_sampler={sampler!r} is not one of {WINDOW_SAMPLERS}'
    )
  blur_first, blur_second, blur_local = tuple(aug.blur_probs)
  global_scales = global_view_scales(crops)
  globals_ = [
      ViewSpec(
          size=int(crops.global_size),
          scale=global_scales[i],
          blur_prob=blur_first if i == 0 else blur_second,
          solarize_prob=0.0 if i == 0 else float(aug.solarize_prob),
          window_sampler=sampler,
      )
      for i in range(int(crops.num_global))
  ]
  locals_ = [
      ViewSpec(
          size=int(crops.local_size),
          scale=tuple(crops.local_scale),
          blur_prob=blur_local,
          solarize_prob=0.0,
          window_sampler=sampler,
      )
      for _ in range(int(crops.num_local))
  ]
  return globals_, locals_


def color_spec(input_config) -> ColorSpec:
  """Photometric settings of `config.input.augment` with the normalization resolved.

  Unset statistics are the dataset's known ones when they have `num_channels` entries,
  else 0.5.
  """
  aug, channels = input_config.augment, int(input_config.num_channels)
  known = known_normalization(input_config.dataset)
  mean, std = aug.normalize_mean, aug.normalize_std
  if mean is None:
    mean = known[0] if known and len(known[0]) == channels else (0.5,) * channels
  if std is None:
    std = known[1] if known and len(known[1]) == channels else (0.5,) * channels
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  for name, value in (('normalize_mean', mean), ('normalize_std', std)):
    if len(value) not in (1, channels):
      raise ValueError(
          f'config.input.augment.{name}={value} must have 1 or {channels} '
          f'entries for config.input.num_channels={channels}'
      )
  if min(std) <= 0:
    raise ValueError(f'config.input.augment.normalize_std={std} must be positive')
  return ColorSpec(
      channels=channels,
      flip=bool(aug.flip),
      color_jitter_prob=float(aug.color_jitter_prob),
      brightness=float(aug.brightness),
      contrast=float(aug.contrast),
      saturation=float(aug.saturation),
      hue=float(aug.hue),
      grayscale_prob=float(aug.grayscale_prob),
      mean=mean,
      std=std,
      resize_method=str(aug.resize_method),
      resize_antialias=bool(aug.resize_antialias),
      xla=bool(aug.xla),
  )


def fold_seed(seed: tf.Tensor, data) -> tf.Tensor:
  """A new [2] seed deterministically derived from `seed` and an integer."""
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64))


# ----------------------------------------------------------------------------
# Geometry.


def sample_crop_window(
    seed: tf.Tensor,
    image_hw: tf.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float] = ASPECT_RATIO_RANGE,
    sampler: str = WINDOW_SAMPLERS[0],
) -> tf.Tensor:
  """Random-resized-crop window [4] int32 (y, x, h, w) inside an image of image_hw.

  'torchvision' draws as `RandomResizedCrop` does (DINO's crops): up to 10 tries of an
  area fraction uniform in `scale` and a log-uniform aspect ratio w / h in `ratio`, the
  first window that fits wins, else a central crop of the whole image clamped to
  `ratio`. 'inception' is `tf.image.sample_distorted_bounding_box` (big_vision's
  inception crop): its ratio is uniform and it falls back to the whole image.
  """
  if sampler == 'torchvision':
    return _torchvision_window(seed, image_hw, scale, ratio)
  if sampler != 'inception':
    raise ValueError(f'window sampler {sampler!r} is not one of {WINDOW_SAMPLERS}')
  image_size = tf.concat([tf.cast(image_hw, tf.int32), [1]], axis=0)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size,
      tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=tuple(ratio),
      area_range=tuple(scale),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _torchvision_window(seed, image_hw, scale, ratio, attempts: int = 10) -> tf.Tensor:
  """All tries of torchvision's RandomResizedCrop.get_params at once; the first fit wins."""
  hw = tf.cast(image_hw, tf.float32)
  draws = tf.random.stateless_uniform([attempts, 4], seed)
  area = hw[0] * hw[1] * (scale[0] + (scale[1] - scale[0]) * draws[:, 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[:, 1])
  # Python's round() in torchvision: halves to even, as tf.round.
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= hw[1]) & (h > 0) & (h <= hw[0])
  first = tf.argmax(tf.cast(fits, tf.int32))
  # Offsets as torch.randint(0, side - crop + 1).
  y = tf.floor(draws[first, 2] * (hw[0] - h[first] + 1))
  x = tf.floor(draws[first, 3] * (hw[1] - w[first] + 1))
  tried = tf.stack([y, x, h[first], w[first]])
  # Fallback: the central crop of the whole image with its aspect clamped to `ratio`.
  image_aspect = hw[1] / hw[0]
  fw = tf.where(image_aspect > ratio[1], tf.round(hw[0] * ratio[1]), hw[1])
  fh = tf.where(image_aspect < ratio[0], tf.round(hw[1] / ratio[0]), hw[0])
  fallback = tf.stack([(hw[0] - fh) // 2, (hw[1] - fw) // 2, fh, fw])
  return tf.cast(tf.where(tf.reduce_any(fits), tried, fallback), tf.int32)


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


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 [..., c] -> [..., channels]: RGB -> gray (ITU-R 601-2 luma), gray -> RGB."""
  have = image.shape[-1]
  if have == channels:
    return image
  if (have, channels) == (3, 1):
    return tf.image.rgb_to_grayscale(image)
  if (have, channels) == (1, 3):
    return tf.tile(image, [1] * (image.shape.rank - 1) + [3])
  raise ValueError(f'cannot convert {have}-channel images to {channels} channels')


def crop_and_resize(
    image: tf.Tensor, window: tf.Tensor, size: int, method: str, antialias: bool = False
) -> tf.Tensor:
  """image [h, w, c] uint8, window (y, x, h, w) -> [size, size, c] float32 in [0, 1]."""
  crop = image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
  resized = tf.image.resize(crop, [size, size], method=method, antialias=antialias)
  return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


# ----------------------------------------------------------------------------
# Photometric ops on one view [s, s, c] float in [0, 1]. Per-view ops beat
# batched ones here: TF's broadcasting kernels (per-view masks/factors over
# [n, s, s, c]) are several times slower than scalar-broadcast ones on CPU.

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as PIL, torchvision and TF.


def adjust_brightness(x, factor):
  """x * factor, clipped to [0, 1]."""
  return tf.clip_by_value(x * factor, 0.0, 1.0)


def adjust_contrast(x, factor):
  """Blend with the mean luma: (x - mean) * factor + mean."""
  mean = tf.reduce_mean(x, axis=[0, 1])
  if x.shape[-1] == 3:
    mean = tf.reduce_sum(mean * tf.constant(_LUMA))  # Mean of luma == luma of mean.
  return tf.clip_by_value(x * factor + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(x, factor):
  """Blend with the luma image, (x - luma) * factor + luma, as one 3x3 matmul."""
  # out_c = factor * x_c + (1 - factor) * sum_k luma_k x_k.
  mix = factor * tf.eye(3) + (1.0 - factor) * tf.constant(_LUMA)[:, None] * tf.ones([1, 3])
  out = tf.reshape(tf.matmul(tf.reshape(x, [-1, 3]), mix), tf.shape(x))
  return tf.clip_by_value(out, 0.0, 1.0)


def adjust_hue(x, delta):
  """Rotates the HSV hue by delta (fraction of a turn)."""
  return tf.clip_by_value(tf.image.adjust_hue(x, delta), 0.0, 1.0)


def to_grayscale(x):
  """[s, s, 3] -> [s, s, 3] with every channel equal to the luma."""
  return tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])


def solarize(x: tf.Tensor) -> tf.Tensor:
  """Inverts values >= 0.5: x -> 1 - x there (0.5 - |x - 0.5| is the same map)."""
  return 0.5 - tf.abs(x - 0.5)


def _normalize(x, mean, std):
  return (x - mean) / std


_xla_compile = functools.partial(tf.function, jit_compile=True, autograph=False)
# XLA fuses these per-pixel chains into single loops (2-3x faster than TF's
# kernels on CPU). Convolutions and the blend ops are not faster under XLA.
_XLA_OPS = {fn: _xla_compile(fn) for fn in (adjust_hue, to_grayscale, _normalize)}


def _op(fn, spec: ColorSpec):
  """fn, XLA-compiled when spec.xla (one compile per input shape)."""
  return _XLA_OPS[fn] if spec.xla else fn


def normalize(x: tf.Tensor, spec: ColorSpec) -> tf.Tensor:
  """(x - mean) / std per channel (last axis), any leading shape."""
  mean = tf.constant(spec.mean, tf.float32)
  std = tf.constant(spec.std, tf.float32)
  return _op(_normalize, spec)(x, mean, std)


def _blur_with_radius(x: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """Separable Gaussian blur, kernel 2 * radius + 1, symmetric padding."""
  channels = x.shape[-1]
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
  kernel /= tf.reduce_sum(kernel)
  y = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='SYMMETRIC')
  k_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  k_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  y = tf.nn.depthwise_conv2d(y, k_v, strides=[1, 1, 1, 1], padding='VALID')
  y = tf.nn.depthwise_conv2d(y, k_h, strides=[1, 1, 1, 1], padding='VALID')
  return y[0]


def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """Gaussian blur of x [h, w, c] (static h, w), kernel half-width ceil(3 sigma).

  The half-width is capped at 6 (3 sigma_max) and at the image size, as
  symmetric padding requires; it is picked among static sizes so that small
  sigmas cost less.
  """
  height, width, _ = x.shape
  max_radius = min(_BLUR_RADIUS, height, width)
  radius = tf.cast(tf.math.ceil(3.0 * sigma), tf.int32)
  branch = tf.clip_by_value(radius, 1, max_radius) - 1
  out = tf.switch_case(
      branch, [lambda r=r: _blur_with_radius(x, sigma, r) for r in range(1, max_radius + 1)]
  )
  return tf.ensure_shape(out, x.shape)


# Columns of the uniform [0, 1) draws [NUM_UNIFORMS] that drive one view.
_U_FLIP, _U_JITTER, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = range(6)
_U_FACTORS = 6  # 4 columns: brightness, contrast, saturation, hue.
_U_ORDER = 10  # 4 columns: sort keys of the jitter order.
NUM_UNIFORMS = 14


def view_uniforms(seed: tf.Tensor, num_views: int) -> tf.Tensor:
  """All uniform draws [num_views, NUM_UNIFORMS] of one example, in one op."""
  return tf.random.stateless_uniform([num_views, NUM_UNIFORMS], seed)


def _jitter_step(x, op, factors, hue_delta, use_xla):
  """Adjustment number `op` (brightness, contrast, saturation, hue) of x."""
  hue = _XLA_OPS[adjust_hue] if use_xla else adjust_hue
  ops = [lambda: adjust_brightness(x, factors[0]), lambda: adjust_contrast(x, factors[1])]
  if x.shape[-1] == 3:
    ops += [lambda: adjust_saturation(x, factors[2]), lambda: hue(x, hue_delta)]
  return tf.ensure_shape(tf.switch_case(op, ops), x.shape)


# One traced function per view shape, called once per jitter step: far less
# tracing than inlining a 4-way switch per step and view.
_JITTER_STEP = tf.function(_jitter_step, autograph=False, reduce_retracing=False)


def color_jitter(x: tf.Tensor, uniforms: tf.Tensor, spec: ColorSpec) -> tf.Tensor:
  """torchvision ColorJitter: brightness, contrast, saturation, hue (the last
  two only for RGB) with random factors, in a random order.

  x: [s, s, c]; uniforms: [NUM_UNIFORMS] draws in [0, 1).
  """
  num_ops = 4 if x.shape[-1] == 3 else 2
  factors = []
  for i, strength in enumerate((spec.brightness, spec.contrast, spec.saturation)):
    low = max(0.0, 1.0 - strength)
    factors.append(low + (1.0 + strength - low) * uniforms[_U_FACTORS + i])
  factors = tf.stack(factors)
  hue_delta = spec.hue * (2.0 * uniforms[_U_FACTORS + 3] - 1.0)
  order = tf.unstack(tf.argsort(uniforms[_U_ORDER : _U_ORDER + num_ops]))
  for op in order:
    x = _JITTER_STEP(x, op, factors, hue_delta, spec.xla)
  return x


def _maybe(draw, prob: float, fn, x):
  """fn(x) when draw < prob (no graph branch when prob is 0 or 1)."""
  if prob <= 0.0:
    return x
  if prob >= 1.0:
    return fn(x)
  return tf.cond(draw < prob, lambda: fn(x), lambda: x)


def photometric(x: tf.Tensor, uniforms: tf.Tensor, view: ViewSpec, spec: ColorSpec) -> tf.Tensor:
  """Flip, colour jitter, grayscale, blur, solarize of one view [s, s, c] in [0, 1].

  uniforms: [NUM_UNIFORMS] draws in [0, 1) that decide every random choice.
  """
  u = tf.unstack(uniforms)
  if spec.flip:
    x = tf.cond(u[_U_FLIP] < 0.5, lambda: tf.reverse(x, [1]), lambda: x)
  if spec.color_jitter_prob > 0 and (
      spec.brightness or spec.contrast or spec.saturation or spec.hue
  ):
    x = _maybe(u[_U_JITTER], spec.color_jitter_prob, lambda v: color_jitter(v, uniforms, spec), x)
  if x.shape[-1] == 3:
    x = _maybe(u[_U_GRAY], spec.grayscale_prob, _op(to_grayscale, spec), x)
  low, high = BLUR_SIGMA_RANGE
  sigma = low + (high - low) * u[_U_SIGMA]
  x = _maybe(u[_U_BLUR], view.blur_prob, lambda v: gaussian_blur(v, sigma), x)
  x = _maybe(u[_U_SOLARIZE], view.solarize_prob, solarize, x)
  return x


# Traced once per (view shape, ViewSpec, ColorSpec) and called per view: 12
# DINO views need 3 traces (2 global specs, 1 local spec), not 12.
_PHOTOMETRIC = tf.function(photometric, autograph=False, reduce_retracing=False)


# ----------------------------------------------------------------------------
# Whole examples.


def _region(image, windows_fn, channels: int, encoded: bool, image_channels: Optional[int]):
  """(decoded region [h', w', channels] uint8, windows [v, 4] relative to it)."""
  if encoded:
    region, windows = decode_windows(image, windows_fn, image_channels or channels)
  else:
    region, windows = image, windows_fn(tf.shape(image)[:2])
  return convert_channels(region, channels), windows


def multicrop(
    image: tf.Tensor,
    seed: tf.Tensor,
    groups: Sequence[Sequence[ViewSpec]],
    spec: ColorSpec,
    *,
    encoded: bool,
    image_channels: Optional[int] = None,
) -> list[tf.Tensor]:
  """All augmented views of one image, one tensor per group of views.

  Args:
    image: decoded [h, w, c] uint8, or a scalar string of encoded bytes when
      `encoded` (PNG, JPEG, GIF, BMP; JPEG uses fused decode-and-crop).
    seed: [2] int seed of this example.
    groups: groups of ViewSpecs of one output size each (e.g. global, local).
    spec: photometric settings.
    encoded: whether `image` holds encoded bytes.
    image_channels: channels to decode encoded bytes to (default spec.channels); 1 and 3
      are converted to spec.channels (`convert_channels`).
  Returns:
    Per group, normalized float32 [len(group), size, size, spec.channels].
  """
  views = [v for group in groups for v in group]
  for group in groups:
    if len({v.size for v in group}) != 1:
      raise ValueError(f'views of one group need one size, got {[v.size for v in group]}')
  # Two RNG ops per example: crop-window seeds and photometric draws.
  window_seeds = tf.unstack(tf.random.experimental.stateless_split(fold_seed(seed, 0), len(views)))
  draws = tf.unstack(view_uniforms(fold_seed(seed, 1), len(views)))

  def windows_fn(image_hw):
    return tf.stack([
        sample_crop_window(s, image_hw, v.scale, sampler=v.window_sampler)
        for s, v in zip(window_seeds, views)
    ])

  region, windows = _region(image, windows_fn, spec.channels, encoded, image_channels)
  outputs, first = [], 0
  for group in groups:
    size = group[0].size
    crops = []
    for i, view in enumerate(group):
      x = crop_and_resize(
          region, windows[first + i], size, spec.resize_method, spec.resize_antialias
      )
      x = tf.ensure_shape(x, [size, size, spec.channels])
      crops.append(_PHOTOMETRIC(x, draws[first + i], view, spec))
    outputs.append(normalize(tf.stack(crops), spec))
    first += len(group)
  return outputs


def eval_view(
    image: tf.Tensor,
    crop_size: int,
    resize_size: int,
    spec: ColorSpec,
    *,
    encoded: bool,
    image_channels: Optional[int] = None,
) -> tf.Tensor:
  """Resize shorter side to resize_size, center crop crop_size, normalize.

  Computed as one crop in original pixels followed by one resize (and, for
  JPEG, a fused decode of that crop only); channels converted as in `multicrop`.
  Returns [crop, crop, spec.channels] float32.
  """

  def windows_fn(image_hw):
    return center_crop_window(image_hw, crop_size, resize_size)[None]

  region, windows = _region(image, windows_fn, spec.channels, encoded, image_channels)
  x = crop_and_resize(region, windows[0], crop_size, spec.resize_method, spec.resize_antialias)
  x.set_shape([crop_size, crop_size, spec.channels])
  return normalize(x, spec)


def eval_views(images: tf.Tensor, crop_size: int, resize_size: int, spec: ColorSpec) -> tf.Tensor:
  """`eval_view` of a batch of decoded images [b, h, w, c] uint8 of one static size.

  One slice and one batched resize instead of b of each (the same kernels, the same
  values). Returns [b, crop, crop, spec.channels] float32.
  """
  height, width = images.shape[1:3]
  if height is None or width is None:
    raise ValueError(f'eval_views needs a static image size, got images of {images.shape}')
  y, x, h, w = tf.unstack(center_crop_window(tf.constant([height, width]), crop_size, resize_size))
  region = convert_channels(images[:, y : y + h, x : x + w], spec.channels)
  resized = tf.image.resize(
      region, [crop_size, crop_size], method=spec.resize_method, antialias=spec.resize_antialias
  )
  out = tf.ensure_shape(
      tf.clip_by_value(resized / 255.0, 0.0, 1.0), [None, crop_size, crop_size, spec.channels]
  )
  return normalize(out, spec)


def default_eval_resize(crop_size: int, resize_size: Optional[int] = None) -> int:
  """ImageNet convention (256 for 224) for >= 64 px crops, no margin below."""
  if resize_size:
    return int(resize_size)
  return int(round(crop_size * 8 / 7)) if crop_size >= 64 else int(crop_size)
