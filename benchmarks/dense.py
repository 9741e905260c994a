"""Throughput of the dense evaluators: DAVIS label propagation and MaskCut.

Random-weight ViTs on synthetic inputs (the cost does not depend on the weights):
  davis:   frames/s of segment_video on 480x854 frames (DAVIS 480p, resized to 480x832 as
           DINO does), features included, and of the propagation alone (features
           precomputed); plus the J/F scoring time of one 480x854 frame with 2 objects.
  maskcut: images/s at 480x480: last-block keys, then the jitted NCut (3 masks).
Compilation is excluded (one warm-up pass with the same shapes).

  python benchmarks/dense.py [--models small,tiny --frames 6 --images 4 --patch 16]

Prints a markdown table and the load average before and after (shared machines).
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from bits_jax.evaluate import davis_metrics
from bits_jax.evaluate import maskcut
from bits_jax.evaluate import video
from bits_jax.models import vit

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _model(size: str, patch: int):
  width, depth, heads = vit.VIT_SIZES[size]
  model = vit.ViT(width=width, depth=depth, num_heads=heads, patch_size=patch, image_size=224)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  return model, variables


def _normalize(frames):
  return (np.asarray(frames, np.float32) / 255.0 - _MEAN) / _STD


def _frames(n: int, height: int = 480, width: int = 854):
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, size=(height // 8, width // 8 + 1, 3), dtype=np.uint8)
  big = np.repeat(np.repeat(base, 8, 0), 8, 1)[:height, :width]
  return [np.roll(big, 4 * t, axis=1) for t in range(n)]


def _first_mask(height: int = 480, width: int = 854):
  mask = np.zeros((height, width), np.int32)
  mask[100:300, 200:400] = 1
  mask[250:450, 500:700] = 2
  return mask


def _timed(fn, repeats: int = 1):
  fn()  # warm-up: compilation
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def bench_davis(size: str, patch: int, n_frames: int, batch_frames: int):
  model, variables = _model(size, patch)
  apply = jax.jit(lambda v, x: model.apply(v, x)["patch_tokens"])

  def features_fn(frames):
    return np.asarray(apply(variables, _normalize(frames)))

  frames, mask = _frames(n_frames), _first_mask()

  def full():
    for _ in video.segment_video(
        iter(frames), mask, features_fn, patch_size=patch, batch_frames=batch_frames
    ):
      pass

  # Propagation alone: features computed once, replayed.
  size_hw = video.frame_size(480, 854, patch_size=patch)
  cache = {}

  def cached_features(batch):
    key = batch.shape
    if key not in cache:
      cache[key] = features_fn(batch)
    return cache[key]

  def propagation_only():
    for _ in video.segment_video(
        iter(frames), mask, cached_features, patch_size=patch, batch_frames=batch_frames
    ):
      pass

  seconds = _timed(full)
  seconds_prop = _timed(propagation_only)
  propagated = n_frames - 1
  setting = f"vit_{size}/{patch}, {size_hw[0]}x{size_hw[1]}, batch_frames={batch_frames}"
  return [
      ("davis: features + propagation", setting, f"{propagated / seconds:.2f} frames/s"),
      ("davis: propagation only", setting, f"{propagated / seconds_prop:.2f} frames/s"),
  ]


def bench_scoring():
  gt = _first_mask()
  pred = np.roll(gt, 6, axis=1)
  seconds = _timed(lambda: davis_metrics.frame_scores(pred, gt, 2), repeats=5)
  return [("davis: J/F scoring", "480x854, 2 objects", f"{1000 * seconds:.1f} ms/frame")]


def bench_maskcut(size: str, patch: int, n_images: int, image_size: int = 480):
  model, variables = _model(size, patch)
  keys_fn = jax.jit(lambda v, x: maskcut.last_block_keys(model, v, x))
  rng = np.random.default_rng(0)
  images = _normalize(rng.integers(0, 255, size=(n_images, image_size, image_size, 3)))
  grid = (image_size // patch,) * 2

  def keys():
    return keys_fn(variables, images).block_until_ready()

  feats = keys()

  def cut():
    return maskcut.batch_masks(feats, grid=grid).block_until_ready()

  t_keys, t_cut = _timed(keys), _timed(cut)
  setting = f"vit_{size}/{patch}, {image_size}px, {grid[0] * grid[1]} patches, 3 masks"
  return [
      ("maskcut: keys + NCut", setting, f"{n_images / (t_keys + t_cut):.2f} images/s"),
      ("maskcut: last-block keys", setting, f"{1000 * t_keys / n_images:.0f} ms/image"),
      ("maskcut: NCut x3", setting, f"{1000 * t_cut / n_images:.0f} ms/image"),
  ]


def _load() -> str:
  return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="small")
  parser.add_argument("--patch", type=int, default=16)
  parser.add_argument("--frames", type=int, default=6)
  parser.add_argument("--batch_frames", type=int, default=4)
  parser.add_argument("--images", type=int, default=4)
  args = parser.parse_args()
  load_before = _load()
  rows = bench_scoring()
  for size in args.models.split(","):
    rows += bench_davis(size, args.patch, args.frames, args.batch_frames)
    rows += bench_maskcut(size, args.patch, args.images)
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform} "
      f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs); "
      f"load average (1/5/15 min) {load_before} before, {_load()} after"
  )
  print("| measure | setting | throughput |\n| --- | --- | --- |")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
