"""Unit tests of the stateless multi-crop augmentations."""

import dataclasses
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bits_jax import config_defaults
from bits_jax.data import augment

_PLAIN = dict(flip=False, color_jitter_prob=0.0, grayscale_prob=0.0)


def _image(h=48, w=64, c=3, seed=0):
  rng = np.random.default_rng(seed)
  smooth = rng.integers(0, 256, (h // 8, w // 8, c)).repeat(8, 0).repeat(8, 1)
  return smooth.astype(np.uint8)


def _encode(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
      buffer, fmt, **({'quality': 95} if fmt == 'JPEG' else {})
  )
  return buffer.getvalue()


def _views(n_global=2, n_local=3, blur=(0.0, 0.0, 0.0), solarize=0.0):
  config = config_defaults.base_config().input
  config.update(
      dict(
          crops=dict(num_global=n_global, num_local=n_local, global_size=24, local_size=12),
          augment=dict(blur_probs=blur, solarize_prob=solarize),
      )
  )
  return augment.view_specs(config)


def _seed(i):
  return tf.constant([i, 7], tf.int64)


def _draws(i):
  return augment.view_uniforms(_seed(i), 1)[0]


def test_view_specs_follow_dino_recipe():
  config = config_defaults.base_config().input
  config.crops.update(dict(num_global=3, num_local=2, global_size=224, local_size=96))
  globals_, locals_ = augment.view_specs(config)
  assert [v.blur_prob for v in globals_] == [1.0, 0.1, 0.1]
  assert [v.solarize_prob for v in globals_] == [0.0, 0.2, 0.2]
  assert [(v.size, v.blur_prob, v.solarize_prob) for v in locals_] == [(96, 0.5, 0.0)] * 2
  assert globals_[0].scale == (0.32, 1.0) and locals_[0].scale == (0.05, 0.32)


def test_global_view_scales_set_each_global_view():
  config = config_defaults.base_config().input
  config.crops.update(dict(num_global=2, num_local=1, global_view_scales=((0.4, 1.0), (1.0, 1.0))))
  globals_, locals_ = augment.view_specs(config)
  assert [v.scale for v in globals_] == [(0.4, 1.0), (1.0, 1.0)]
  assert locals_[0].scale == tuple(config.crops.local_scale)
  config.crops.global_view_scales = ()
  assert [v.scale for v in augment.view_specs(config)[0]] == [(0.32, 1.0)] * 2


@pytest.mark.parametrize(
    'scales, match',
    [
        (((0.4, 1.0),), 'has 1 .* pairs for num_global=2'),
        (((0.4, 1.0), (1.0, 0.5)), 'each entry must be'),
        ((0.4, 1.0), 'one .low, high. pair of numbers per global view'),
        ((('a', 1.0), (1.0, 1.0)), 'one .low, high. pair of numbers per global view'),
    ],
)
def test_global_view_scales_errors_name_the_fix(scales, match):
  config = config_defaults.base_config().input
  config.crops.global_view_scales = scales
  with pytest.raises(ValueError, match=match):
    augment.view_specs(config)


@pytest.mark.parametrize('sampler', augment.WINDOW_SAMPLERS)
def test_whole_image_global_view(sampler):
  """Scale (1, 1) on a square image: that view is the whole image, whatever the seed."""
  image = _image(h=48, w=48, c=1)
  config = config_defaults.base_config().input
  config.update(
      dict(num_channels=1, augment=dict(_PLAIN, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0))
  )
  config.crops.update(
      dict(
          num_global=2,
          global_size=24,
          window_sampler=sampler,
          global_view_scales=((0.2, 0.3), (1.0, 1.0)),
      )
  )
  globals_, _ = augment.view_specs(config)
  spec = augment.color_spec(config)
  whole = augment.eval_view(tf.constant(image), 24, 24, spec, encoded=False).numpy()
  for i in range(8):
    views = augment.multicrop(tf.constant(image), _seed(i), [globals_], spec, encoded=False)[0]
    np.testing.assert_allclose(views[1].numpy(), whole, atol=1e-5)
    assert not np.allclose(views[0].numpy(), whole, atol=1e-2)


@pytest.mark.parametrize(
    'dataset', ['imagenet2012', 'imagenet2012:5.1.0', 'imagenet2012_subset/10pct:5.0.0']
)
def test_known_normalization_ignores_tfds_version_and_config(dataset):
  config = config_defaults.base_config().input
  config.update(dict(dataset=dataset, num_channels=3))
  spec = augment.color_spec(config)
  assert (spec.mean, spec.std) == augment.KNOWN_NORMALIZATION['imagenet2012']
  config.dataset = 'idx:/data/mnist'  # Paths of other sources are no TFDS names.
  assert augment.color_spec(config).mean == (0.5,) * 3


@pytest.mark.parametrize('sampler', augment.WINDOW_SAMPLERS)
@pytest.mark.parametrize('scale', [(0.05, 0.32), (0.32, 1.0)])
def test_crop_window_area_and_aspect(scale, sampler):
  for i in range(30):
    y, x, h, w = augment.sample_crop_window(
        _seed(i), tf.constant([300, 400]), scale, sampler=sampler
    ).numpy()
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    area = h * w / (300 * 400)
    fallback = (h, w) == (300, 400)
    assert fallback or scale[0] - 0.02 <= area <= scale[1] + 0.02
    assert fallback or 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def _torchvision_get_params(height, width, scale, ratio, draws):
  """torchvision's RandomResizedCrop.get_params, its random numbers taken from `draws`."""
  for u_area, u_ratio, u_y, u_x in draws:
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_ratio = np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u_ratio
    w = int(round(np.sqrt(area * np.exp(log_ratio))))
    h = int(round(np.sqrt(area / np.exp(log_ratio))))
    if 0 < w <= width and 0 < h <= height:
      return int(u_y * (height - h + 1)), int(u_x * (width - w + 1)), h, w
  if width / height < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif width / height > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    'hw, scale',
    [
        ((28, 28), (0.4, 1.0)),
        ((375, 500), (0.05, 0.4)),
        ((50, 400), (0.9, 1.0)),
        ((400, 60), (0.9, 1.0)),
        ((3, 3), (0.01, 0.05)),
    ],
)
def test_torchvision_window_matches_get_params(hw, scale):
  # The last three draw windows that rarely or never fit: the clamped central fallback.
  for i in range(40):
    draws = tf.random.stateless_uniform([10, 4], _seed(i)).numpy().astype(np.float64)
    want = _torchvision_get_params(*hw, scale, augment.ASPECT_RATIO_RANGE, draws)
    got = augment.sample_crop_window(_seed(i), tf.constant(hw), scale, sampler='torchvision')
    np.testing.assert_array_equal(got.numpy(), want, err_msg=f'{hw} {scale} draw {i}')


def test_torchvision_window_ratio_is_log_uniform():
  seeds = tf.stack([_seed(i) for i in range(2000)])
  sample = lambda seed: augment.sample_crop_window(seed, tf.constant([900, 900]), (0.2, 0.3))
  windows = tf.function(lambda s: tf.map_fn(sample, s, fn_output_signature=tf.int32))(seeds)
  windows = windows.numpy()
  log_ratio = np.log(windows[:, 3] / windows[:, 2])
  # Log-uniform on [log 3/4, log 4/3] has mean 0 (here -0.007); TF's uniform ratio has
  # E[log r] = 0.028 (here 0.027). The standard error over 2000 draws is 0.004.
  assert abs(np.mean(log_ratio)) < 0.015
  assert np.all(np.abs(log_ratio) <= np.log(4 / 3) + 0.01)


def test_unknown_window_sampler_is_named():
  config = config_defaults.base_config().input
  config.crops.window_sampler = 'pil'
  with pytest.raises(ValueError, match='window_sampler=.pil.*torchvision'):
    augment.view_specs(config)
  config.crops.window_sampler = 'inception'
  assert {v.window_sampler for v in sum(augment.view_specs(config), [])} == {'inception'}


def test_center_crop_window_matches_resize_then_crop():
  # 375x500 -> shorter side 256 -> center 224 == central 328x328 of the original.
  window = augment.center_crop_window(tf.constant([375, 500]), 224, 256).numpy()
  np.testing.assert_array_equal(window, [23, 86, 328, 328])
  assert augment.default_eval_resize(224) == 256 and augment.default_eval_resize(28) == 28


def _groups(**kwargs):
  return [g for g in _views(**kwargs) if g]


def test_fused_jpeg_decode_matches_full_decode():
  image = _image()
  data = _encode(image, 'JPEG')
  decoded = tf.io.decode_jpeg(data, channels=3)
  spec = augment.ColorSpec(channels=3)
  groups = _groups(blur=(1.0, 0.1, 0.5), solarize=0.2)
  # PIL's default 4:2:0 chroma subsampling exercises libjpeg's crop-edge
  # upsampling, which the decoded margin must hide: results are identical.
  small = _groups(n_global=0, n_local=1)  # Small union windows.
  for i in range(12):
    for g in (groups, small):
      fused = augment.multicrop(tf.constant(data), _seed(i), g, spec, encoded=True)
      full = augment.multicrop(decoded, _seed(i), g, spec, encoded=False)
      for a, b in zip(fused, full):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_png_bytes_match_decoded_array_and_eval_view():
  image = _image(c=1)
  spec = augment.ColorSpec(channels=1, **_PLAIN)
  groups = _groups()
  encoded = augment.multicrop(
      tf.constant(_encode(image, 'PNG')), _seed(3), groups, spec, encoded=True
  )
  decoded = augment.multicrop(tf.constant(image), _seed(3), groups, spec, encoded=False)
  assert [x.shape for x in encoded] == [(2, 24, 24, 1), (3, 12, 12, 1)]
  for a, b in zip(encoded, decoded):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  ev = augment.eval_view(tf.constant(_encode(image, 'PNG')), 48, 48, spec, encoded=True)
  np.testing.assert_allclose(ev.numpy(), (image[:, 8:56] / 255 - 0.5) / 0.5, atol=1e-5)


def test_groups_need_one_size():
  view = augment.ViewSpec(size=8, scale=(1, 1), blur_prob=0, solarize_prob=0)
  with pytest.raises(ValueError, match='one size'):
    augment.multicrop(
        tf.constant(_image()),
        _seed(0),
        [[view, dataclasses.replace(view, size=9)]],
        augment.ColorSpec(channels=3),
        encoded=False,
    )


def test_flip_mirrors_some_views():
  image = _image(32, 32)
  spec = augment.ColorSpec(
      channels=3, flip=True, color_jitter_prob=0.0, grayscale_prob=0.0, mean=(0.0,), std=(1.0,)
  )
  view = augment.ViewSpec(size=32, scale=(1.0, 1.0), blur_prob=0.0, solarize_prob=0.0)
  out = (
      augment.multicrop(tf.constant(image), _seed(0), [[view] * 16], spec, encoded=False)[0].numpy()
      * 255
  )
  flipped = []
  for x in out:
    if np.allclose(x, image, atol=0.5):
      flipped.append(False)
    else:
      np.testing.assert_allclose(x, image[:, ::-1], atol=0.5)
      flipped.append(True)
  assert 0 < sum(flipped) < 16


@pytest.mark.parametrize('xla', [False, True])
def test_grayscale_and_solarize(xla):
  image = tf.constant(np.random.default_rng(0).uniform(size=(16, 16, 3)), tf.float32)
  spec = augment.ColorSpec(
      channels=3, flip=False, color_jitter_prob=0.0, grayscale_prob=1.0, xla=xla
  )
  gray = np.repeat(tf.image.rgb_to_grayscale(image).numpy(), 3, -1)
  for prob, expected in ((0.0, gray), (1.0, np.where(gray >= 0.5, 1 - gray, gray))):
    view = augment.ViewSpec(size=16, scale=(1, 1), blur_prob=0.0, solarize_prob=prob)
    out = augment.photometric(image, _draws(0), view, spec).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize('xla', [False, True])
def test_color_jitter_matches_reference(xla):
  """Factors and order come from the draws; compare with TF's image ops."""
  rng = np.random.default_rng(0)
  spec = augment.ColorSpec(channels=3, xla=xla)
  orders = set()
  for i in range(6):
    rgb = tf.constant(rng.uniform(0.0, 1.0, size=(10, 10, 3)), tf.float32)
    out = augment.color_jitter(rgb, _draws(i), spec).numpy()
    u = _draws(i).numpy()
    f = [0.6 + 0.8 * u[6], 0.6 + 0.8 * u[7], 0.8 + 0.4 * u[8]]
    delta = 0.1 * (2 * u[9] - 1)
    x = rgb
    order = np.argsort(u[10:14], kind='stable')
    orders.add(tuple(order))
    for op in order:
      if op == 0:
        x = tf.clip_by_value(x * f[0], 0, 1)
      elif op == 1:
        mean = tf.reduce_mean(tf.image.rgb_to_grayscale(x))
        x = tf.clip_by_value((x - mean) * f[1] + mean, 0, 1)
      elif op == 2:
        gray = tf.image.rgb_to_grayscale(x)
        x = tf.clip_by_value((x - gray) * f[2] + gray, 0, 1)
      else:
        x = tf.clip_by_value(tf.image.adjust_hue(x, delta), 0, 1)
    np.testing.assert_allclose(out, x.numpy(), atol=2e-5)
  assert len(orders) > 1


def test_color_jitter_single_channel_only_brightness_contrast():
  gray = tf.constant(np.random.default_rng(0).uniform(0.2, 0.8, size=(16, 16, 1)), tf.float32)
  spec = augment.ColorSpec(channels=1, brightness=0.0, contrast=0.0, saturation=1.0, hue=0.5)
  np.testing.assert_allclose(
      augment.color_jitter(gray, _draws(1), spec).numpy(), gray.numpy(), atol=1e-6
  )
  spec = augment.ColorSpec(channels=1, brightness=0.4, contrast=0.4)
  assert not np.allclose(augment.color_jitter(gray, _draws(1), spec).numpy(), gray.numpy())


def test_gaussian_blur():
  constant = tf.fill([20, 20, 3], 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(constant, 2.0).numpy(), 0.3, atol=1e-6)
  noise = tf.constant(np.random.default_rng(0).uniform(size=(20, 20, 1)), tf.float32)
  np.testing.assert_allclose(augment.gaussian_blur(noise, 0.1).numpy(), noise.numpy(), atol=1e-4)
  out = augment.gaussian_blur(noise, 2.0).numpy()
  assert out.std() < 0.5 * noise.numpy().std()
  # Matches a direct 2-D Gaussian filter (half-width 6) away from the borders.
  k = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
  k /= k.sum()
  plane = noise[:, :, 0].numpy()
  direct = sum(k[i] * k[j] * plane[i : i + 8, j : j + 8] for i in range(13) for j in range(13))
  np.testing.assert_allclose(out[6:14, 6:14, 0], direct, atol=1e-5)  # Interior 8x8.
  tiny = tf.constant(np.random.default_rng(0).uniform(size=(4, 4, 1)), tf.float32)
  assert augment.gaussian_blur(tiny, 2.0).shape == (4, 4, 1)


def test_same_seed_same_views_different_seed_differs():
  image = tf.constant(_image())
  spec = augment.ColorSpec(channels=3)
  groups = _groups(blur=(1.0, 0.1, 0.5), solarize=0.2)
  a = augment.multicrop(image, _seed(5), groups, spec, encoded=False)
  b = augment.multicrop(image, _seed(5), groups, spec, encoded=False)
  c = augment.multicrop(image, _seed(6), groups, spec, encoded=False)
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.allclose(x.numpy(), z.numpy())


def test_xla_and_tf_kernels_agree():
  image = tf.constant(_image())
  groups = _groups(n_local=1, blur=(1.0, 0.1, 0.5), solarize=0.2)
  a = augment.multicrop(
      image, _seed(1), groups, augment.ColorSpec(channels=3, xla=True), encoded=False
  )
  b = augment.multicrop(
      image, _seed(1), groups, augment.ColorSpec(channels=3, xla=False), encoded=False
  )
  for x, y in zip(a, b):
    np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-4)
