"""Unit tests of the stateless multi-crop augmentations."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bits_jax.data import augment
from bits_jax.data import pipeline

_PLAIN = dict(flip=False, color_jitter_prob=0.0, grayscale_prob=0.0)


def _image(h=48, w=64, c=3, seed=0):
  rng = np.random.default_rng(seed)
  smooth = rng.integers(0, 256, (h // 8, w // 8, c)).repeat(8, 0).repeat(8, 1)
  return smooth.astype(np.uint8)


def _encode(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
      buffer, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def _views(n_global=2, n_local=3, blur=(0.0, 0.0, 0.0), solarize=0.0):
  config = pipeline.default_data_config()
  config.update(dict(num_global_crops=n_global, num_local_crops=n_local,
                     global_crop_size=24, local_crop_size=12, blur_probs=blur,
                     solarize_prob=solarize))
  return augment.view_specs(config)


def _seed(i):
  return tf.constant([i, 7], tf.int64)


def test_view_specs_follow_dino_recipe():
  config = pipeline.default_data_config()
  config.update(dict(num_global_crops=3, num_local_crops=2, global_crop_size=224,
                     local_crop_size=96))
  globals_, locals_ = augment.view_specs(config)
  assert [v.blur_prob for v in globals_] == [1.0, 0.1, 0.1]
  assert [v.solarize_prob for v in globals_] == [0.0, 0.2, 0.2]
  assert [(v.size, v.blur_prob, v.solarize_prob) for v in locals_] == [(96, 0.5, 0.0)] * 2
  assert globals_[0].scale == (0.32, 1.0) and locals_[0].scale == (0.05, 0.32)


@pytest.mark.parametrize('scale', [(0.05, 0.32), (0.32, 1.0)])
def test_crop_window_area_and_aspect(scale):
  for i in range(30):
    y, x, h, w = augment.sample_crop_window(_seed(i), tf.constant([300, 400]), scale).numpy()
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    area = h * w / (300 * 400)
    fallback = (h, w) == (300, 400)
    assert fallback or scale[0] - 0.02 <= area <= scale[1] + 0.02
    assert fallback or 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_center_crop_window_matches_resize_then_crop():
  # 375x500 -> shorter side 256 -> center 224 == central 328x328 of the original.
  window = augment.center_crop_window(tf.constant([375, 500]), 224, 256).numpy()
  np.testing.assert_array_equal(window, [23, 86, 328, 328])
  assert augment.default_eval_resize(224) == 256 and augment.default_eval_resize(28) == 28


def test_fused_jpeg_decode_matches_full_decode():
  image = _image()
  data = _encode(image, 'JPEG')
  decoded = tf.io.decode_jpeg(data, channels=3)
  spec = augment.ColorSpec(channels=3)
  views = sum(_views(blur=(1.0, 0.1, 0.5), solarize=0.2), [])
  # PIL's default 4:2:0 chroma subsampling exercises libjpeg's crop-edge
  # upsampling, which the decoded margin must hide: results are identical.
  small_views = _views(n_global=0, n_local=1)[1]  # Small union windows.
  for i in range(12):
    for v in (views, small_views):
      fused = augment.multicrop(tf.constant(data), _seed(i), v, spec, encoded=True)
      full = augment.multicrop(decoded, _seed(i), v, spec, encoded=False)
      for a, b in zip(fused, full):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_png_bytes_match_decoded_array_and_eval_view():
  image = _image(c=1)
  spec = augment.ColorSpec(channels=1, **_PLAIN)
  views = sum(_views(), [])
  encoded = augment.multicrop(tf.constant(_encode(image, 'PNG')), _seed(3), views, spec,
                              encoded=True)
  decoded = augment.multicrop(tf.constant(image), _seed(3), views, spec, encoded=False)
  for a, b in zip(encoded, decoded):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  ev = augment.eval_view(tf.constant(_encode(image, 'PNG')), 48, 48, spec, encoded=True)
  np.testing.assert_allclose(ev.numpy(), (image[:, 8:56] / 255 - 0.5) / 0.5, atol=1e-5)


def test_flip_mirrors_some_views():
  image = _image(32, 32)
  spec = augment.ColorSpec(channels=3, flip=True, color_jitter_prob=0.0, grayscale_prob=0.0,
                           mean=(0.0,), std=(1.0,))
  view = augment.ViewSpec(size=32, scale=(1.0, 1.0), blur_prob=0.0, solarize_prob=0.0)
  flipped = []
  for i in range(16):
    out = augment.multicrop(tf.constant(image), _seed(i), [view], spec, encoded=False)[0]
    out = out.numpy() * 255
    if np.allclose(out, image, atol=0.5):
      flipped.append(False)
    else:
      np.testing.assert_allclose(out, image[:, ::-1], atol=0.5)
      flipped.append(True)
  assert 0 < sum(flipped) < 16


def test_grayscale_and_solarize():
  image = tf.constant(np.random.default_rng(0).uniform(size=(16, 16, 3)), tf.float32)
  spec = augment.ColorSpec(channels=3, flip=False, color_jitter_prob=0.0, grayscale_prob=1.0)
  view = augment.ViewSpec(size=16, scale=(1, 1), blur_prob=0.0, solarize_prob=1.0)
  out = augment.photometric(image, _seed(0), view, spec).numpy()
  gray = tf.image.rgb_to_grayscale(image).numpy()
  expected = np.where(gray >= 0.5, 1 - gray, gray)
  np.testing.assert_allclose(out, np.repeat(expected, 3, -1), atol=1e-6)


def test_color_jitter_bounds_and_single_channel():
  rng = np.random.default_rng(0)
  rgb = tf.constant(rng.uniform(0.2, 0.7, size=(16, 16, 3)), tf.float32)
  spec = augment.ColorSpec(channels=3, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
  for i in range(5):
    out = augment.color_jitter(rgb, _seed(i), spec).numpy()
    factor = out / rgb.numpy()
    assert np.allclose(factor, factor.flat[0], atol=1e-5) and 0.6 <= factor.flat[0] <= 1.4
  # Saturation and hue never touch 1-channel images; brightness/contrast do.
  gray = tf.constant(rng.uniform(0.2, 0.8, size=(16, 16, 1)), tf.float32)
  spec1 = augment.ColorSpec(channels=1, brightness=0.0, contrast=0.0, saturation=1.0, hue=0.5)
  np.testing.assert_allclose(augment.color_jitter(gray, _seed(1), spec1).numpy(), gray.numpy(),
                             atol=1e-6)
  spec2 = augment.ColorSpec(channels=1, brightness=0.4, contrast=0.4)
  assert not np.allclose(augment.color_jitter(gray, _seed(1), spec2).numpy(), gray.numpy())
  # Colour jitter changes hue/saturation of RGB images.
  spec3 = augment.ColorSpec(channels=3, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)
  hsv_in = tf.image.rgb_to_hsv(rgb).numpy()
  hsv_out = tf.image.rgb_to_hsv(augment.color_jitter(rgb, _seed(2), spec3)).numpy()
  assert np.abs(hsv_in[..., 0] - hsv_out[..., 0]).mean() > 0.01


def test_gaussian_blur():
  constant = tf.fill([20, 20, 3], 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(constant, 2.0).numpy(), 0.3, atol=1e-6)
  noise = tf.constant(np.random.default_rng(0).uniform(size=(20, 20, 1)), tf.float32)
  sharp = augment.gaussian_blur(noise, 0.1).numpy()
  np.testing.assert_allclose(sharp, noise.numpy(), atol=1e-4)
  assert augment.gaussian_blur(noise, 2.0).numpy().std() < 0.5 * noise.numpy().std()
  tiny = tf.constant(np.random.default_rng(0).uniform(size=(4, 4, 1)), tf.float32)
  assert augment.gaussian_blur(tiny, 2.0).shape == (4, 4, 1)


def test_same_seed_same_views_different_seed_differs():
  image = tf.constant(_image())
  spec = augment.ColorSpec(channels=3)
  views = sum(_views(blur=(1.0, 0.1, 0.5), solarize=0.2), [])
  a = augment.multicrop(image, _seed(5), views, spec, encoded=False)
  b = augment.multicrop(image, _seed(5), views, spec, encoded=False)
  c = augment.multicrop(image, _seed(6), views, spec, encoded=False)
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.allclose(x.numpy(), z.numpy())
