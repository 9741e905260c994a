"""Images/s of the DINO multi-crop input pipeline: bits_jax (tf.data) vs torchvision.

Writes a few hundred ImageNet-sized JPEGs (500x375, smooth synthetic content
with texture, quality 90) into a temporary image folder, then measures, each in
a fresh process pinned to a fixed set of CPU cores:
  * bits_jax: `make_train_iterator` on 'imagefolder:' (fused decode-and-crop
    JPEG, 2 x 224 global + 10 x 96 local crops, full DINO augmentations), with
    a tf.data private thread pool of as many threads as cores;
  * torchvision: `ImageFolder` + `DataLoader` with the same DINO augmentations
    (PIL decode, RandomResizedCrop bicubic, flip, ColorJitter, grayscale,
    Gaussian blur, solarize, normalize), with as many workers as cores.
torch lives in a separate interpreter (--torch-python, default
/work/bench-venv/bin/python); without it the torch side is skipped with a
message.

Usage:
  python benchmarks/input_pipeline.py [--cores 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_TORCH_PYTHON = '/work/bench-venv/bin/python'


def write_jpeg_folder(root: str, num_images: int, width: int, height: int, seed: int = 0):
  """num_images JPEGs in 10 class folders; returns their mean size in bytes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  sizes = []
  for i in range(num_images):
    image = np.zeros((height, width, 3), np.float32)
    # Low-frequency colour waves, a few soft blobs and fine texture: decodes
    # like a photo (non-trivial DCT content), unlike flat or white-noise images.
    for c in range(3):
      for _ in range(3):
        fy, fx = rng.uniform(0.002, 0.03, 2)
        image[..., c] += 40 * np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 6.3))
    for _ in range(4):
      cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
      image += blob[..., None] * rng.uniform(-90, 90, 3)
    image += 128 + rng.normal(0, 12, image.shape)
    path = os.path.join(root, f'class_{i % 10}', f'img_{i:05d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
    sizes.append(os.path.getsize(path))
  return float(np.mean(sizes))


# ----------------------------------------------------------------------------
# Measurement processes (each pinned to its cores before importing anything).


def measure_tf(
    folder: str, cores: int, batch_size: int, warmup: int, batches: int, antialias: bool
) -> dict:
  """Runs in a child process: images/s of bits_jax's train iterator."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ['CUDA_VISIBLE_DEVICES'] = ''
  sys.path.insert(0, _REPO)
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  config = config_defaults.base_config()
  config.input.update(
      dict(
          dataset=f'imagefolder:{folder}',
          num_channels=3,
          batch_size=batch_size,
          threads=cores,
          prefetch_batches=2,
          crops=dict(num_global=2, num_local=10, global_size=224, local_size=96),
          # Same normalization arithmetic as the torch side.
          augment=dict(
              resize_antialias=antialias,
              normalize_mean=(0.485, 0.456, 0.406),
              normalize_std=(0.229, 0.224, 0.225),
          ),
      )
  )
  iterator = data.make_train_iterator(config, process_index=0, process_count=1)
  for _ in range(warmup):
    batch = next(iterator)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(iterator)
  seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
  assert batch['global'].shape == (batch_size, 2, 224, 224, 3)
  assert batch['local'].shape == (batch_size, 10, 96, 96, 3)
  return {
      'images_per_s': batches * batch_size / seconds,
      'images_per_cpu_s': batches * batch_size / cpu,
      'seconds': seconds,
  }


_TORCH_SCRIPT = textwrap.dedent('''
    import json, os, random, sys, time
    cores = [int(c) for c in sys.argv[2].split(',')]
    os.sched_setaffinity(0, cores)
    import torch
    from PIL import ImageFilter, ImageOps
    from torchvision import datasets, transforms as T

    folder, _, batch_size, warmup, batches = sys.argv[1:6]
    batch_size, warmup, batches = int(batch_size), int(warmup), int(batches)
    torch.set_num_threads(1)

    class Blur:
      def __init__(self, p):
        self.p = p
      def __call__(self, img):
        if random.random() >= self.p:
          return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    class Solarize:
      def __init__(self, p):
        self.p = p
      def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img

    bicubic = T.InterpolationMode.BICUBIC
    flip_color = T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406),
                                                (0.229, 0.224, 0.225))])
    global1 = T.Compose([T.RandomResizedCrop(224, scale=(0.32, 1.0), interpolation=bicubic),
                         flip_color, Blur(1.0), norm])
    global2 = T.Compose([T.RandomResizedCrop(224, scale=(0.32, 1.0), interpolation=bicubic),
                         flip_color, Blur(0.1), Solarize(0.2), norm])
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.32), interpolation=bicubic),
                       flip_color, Blur(0.5), norm])

    def multicrop(img):
      return [global1(img), global2(img)] + [local(img) for _ in range(10)]

    data = datasets.ImageFolder(folder, transform=multicrop)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=len(cores), drop_last=True,
        persistent_workers=True, prefetch_factor=2)
    pids = set()

    def forever():
      while True:
        epoch = iter(loader)
        pids.update(w.pid for w in epoch._workers)
        yield from epoch

    def cpu_seconds():
      """User + system CPU time of this process and its loader workers."""
      total = 0
      for pid in {os.getpid()} | pids:
        with open(f'/proc/{pid}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks).
      return total / os.sysconf('SC_CLK_TCK')

    it = forever()
    for _ in range(warmup):
      crops, labels = next(it)
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
      crops, labels = next(it)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    assert tuple(crops[0].shape) == (batch_size, 3, 224, 224) and len(crops) == 12
    print(json.dumps({'images_per_s': batches * batch_size / seconds,
                      'images_per_cpu_s': batches * batch_size / cpu, 'seconds': seconds,
                      'torch': torch.__version__}))
''')


def _run_child(command):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f'{command[:3]} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def run_tf(folder, cores, args, antialias):
  spec = dict(
      folder=folder,
      cores=cores,
      batch_size=args.batch_size,
      warmup=args.warmup,
      batches=args.batches,
      antialias=antialias,
  )
  return _run_child([sys.executable, os.path.abspath(__file__), '--_child-tf', json.dumps(spec)])


def run_torch(torch_python, folder, cores, args):
  return _run_child([
      torch_python,
      '-c',
      _TORCH_SCRIPT,
      folder,
      ','.join(map(str, cores)),
      str(args.batch_size),
      str(args.warmup),
      str(args.batches),
  ])


def _torch_available(torch_python: str) -> str | None:
  """None when torch+torchvision import in torch_python, else the reason."""
  if not torch_python or not os.path.exists(torch_python):
    return f'no interpreter at {torch_python!r}'
  probe = subprocess.run(
      [torch_python, '-c', 'import torch, torchvision'], capture_output=True, text=True, check=False
  )
  return None if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


def _summary(runs):
  return {
      'images_per_s': statistics.median(r['images_per_s'] for r in runs),
      'images_per_cpu_s': statistics.median(r['images_per_cpu_s'] for r in runs),
      'runs': runs,
  }


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--num-images', type=int, default=320)
  parser.add_argument('--width', type=int, default=500)
  parser.add_argument('--height', type=int, default=375)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--warmup', type=int, default=2, help='untimed batches first')
  parser.add_argument('--batches', type=int, default=8, help='timed batches')
  parser.add_argument(
      '--cores',
      type=int,
      nargs='+',
      default=[1, 2],
      help='core counts to measure (threads = workers = cores)',
  )
  parser.add_argument(
      '--repeats', type=int, default=2, help='alternating runs per setting; medians are reported'
  )
  parser.add_argument(
      '--antialias',
      choices=['off', 'on', 'both'],
      default='both',
      help='bits_jax resize_antialias setting(s) to measure',
  )
  parser.add_argument('--torch-python', default=_DEFAULT_TORCH_PYTHON)
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args()

  available = sorted(os.sched_getaffinity(0))
  antialias = {'off': [False], 'on': [True], 'both': [False, True]}[args.antialias]
  folder = tempfile.mkdtemp(prefix='bits_bench_jpegs_')
  try:
    mean_bytes = write_jpeg_folder(folder, args.num_images, args.width, args.height)
    print(
        f'{args.num_images} JPEGs {args.width}x{args.height}, mean {mean_bytes / 1e3:.0f} kB; '
        f'machine: {os.cpu_count()} logical CPUs ({len(available)} usable); batch '
        f'{args.batch_size}, {args.batches} timed batches, median of {args.repeats}',
        flush=True,
    )
    torch_missing = _torch_available(args.torch_python)
    if torch_missing:
      print(
          f'SKIPPING torchvision: {torch_missing}. Create it with: python3 -m venv '
          '/work/bench-venv && /work/bench-venv/bin/pip install torch torchvision pillow '
          'numpy, then pass --torch-python /work/bench-venv/bin/python',
          flush=True,
      )
    results = []
    for n in args.cores:
      if n > len(available):
        print(f'skipping {n} cores: only {len(available)} usable')
        continue
      cores = available[:n]
      runs = {f'bits_jax_aa_{"on" if aa else "off"}': [] for aa in antialias}
      runs['torchvision'] = []
      for _ in range(args.repeats):
        for aa in antialias:
          runs[f'bits_jax_aa_{"on" if aa else "off"}'].append(run_tf(folder, cores, args, aa))
        if not torch_missing:
          runs['torchvision'].append(run_torch(args.torch_python, folder, cores, args))
      row = {'cores': n}
      for name, measured in runs.items():
        if measured:
          row[name] = _summary(measured)
      results.append(row)
      for name in row:
        if name == 'cores':
          continue
        line = (
            f"cores={n} {name:16s} {row[name]['images_per_s']:6.1f} img/s wall, "
            f"{row[name]['images_per_cpu_s']:6.1f} img per CPU-second"
        )
        if 'torchvision' in row and name != 'torchvision':
          ratio_cpu = row[name]['images_per_cpu_s'] / row['torchvision']['images_per_cpu_s']
          ratio_wall = row[name]['images_per_s'] / row['torchvision']['images_per_s']
          line += f'; vs torchvision: {ratio_cpu:.2f}x per CPU-s, {ratio_wall:.2f}x wall'
        print(line, flush=True)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(
            {
                'machine_cpus': os.cpu_count(),
                'num_images': args.num_images,
                'mean_jpeg_bytes': mean_bytes,
                'batch_size': args.batch_size,
                'results': results,
            },
            f,
            indent=1,
        )
  finally:
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--_child-tf':
    _spec = json.loads(sys.argv[2])
    os.sched_setaffinity(0, _spec.pop('cores'))  # Before TF starts its threads.
    print(json.dumps(measure_tf(cores=len(os.sched_getaffinity(0)), **_spec)))
  else:
    main()
