"""Train-step throughput, memory and MFU of BITS over meshes of 1, 2, 4, 8 devices.

Runs the project's own jitted step (`train_step.compile_train_step` with the partition
rules' state shardings and the ('data', 'fsdp') batch sharding) on synthetic multi-crop
batches, for each model and each mesh:
  * images/s and ms per step (median of `--repeats` timings of `--steps` steps, after one
    warm-up step; compilation is timed apart);
  * memory per device: the device's peak bytes in use where the runtime reports it
    (GPU/TPU), else XLA's compiled estimate (arguments + outputs - donated aliases + temps);
    the train state's bytes per device;
  * model FLOPs per step from an analytic count (teacher forward on the global crops,
    student forward + backward = 3x forward on all crops), XLA's own count next to it on one
    device as a check, and MFU = achieved model FLOP/s / peak FLOP/s, reported only on a
    GPU/TPU with a known bfloat16 peak (or `--peak_tflops`).

On a CPU the devices are fake (`--xla_force_host_platform_device_count=8`): they share the
host's cores, so more devices do not add compute; the figures show the sharding overhead
and the memory per device, not a speed-up.

Usage:
  python benchmarks/scaling.py                      # CPU: ViT-T/S, 1/2/4/8 devices, DP + FSDP
  python benchmarks/scaling.py --models vit_small --devices 1 --recipe imagenet  # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import common  # pylint: disable=g-import-not-at-top,wrong-import-position  # repo on sys.path
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from bits_jax import config_defaults  # pylint: disable=wrong-import-position
from bits_jax import sharding as sharding_lib  # pylint: disable=wrong-import-position
from bits_jax.models import vit  # pylint: disable=wrong-import-position

RECIPES = {
    # CPU-sized crops so a 2-core machine finishes; 'imagenet' is the paper's multi-crop.
    "cpu": dict(
        crops=dict(global_size=64, local_size=32, num_global=2, num_local=4), dtype="float32"
    ),
    "imagenet": dict(
        crops=dict(global_size=224, local_size=96, num_global=2, num_local=10), dtype="bfloat16"
    ),
}


def bench_config(model: str, batch_size: int, recipe: str, mesh: dict, remat: bool):
  """BITS with a 256-bit head (2048-2048-256) on `model`/16, no head re-init."""
  config = config_defaults.base_config()
  config.dtype = RECIPES[recipe]["dtype"]
  config.input.crops.update(RECIPES[recipe]["crops"])
  config.input.num_channels = 3
  config.input.batch_size = batch_size
  config.model = dict(name=model, patch_size=16, remat=remat)
  config.objective.name = "bits"
  config.objective.bits.num_bits = 256
  config.objective.head.reset_every_steps = 0
  config.objective.head.update(dict(hidden_dim=2048, bottleneck_dim=256, num_layers=3))
  config.total_steps = 1000
  config.mesh = mesh
  return config


# ------------------------------------------------------------------------------ FLOPs


def train_step_flops(config) -> float:
  """Model FLOPs of one train step on the global batch (backward = 2x forward)."""
  width, depth, _ = vit.VIT_SIZES[config.model.name[len("vit_") :]]
  head = config.objective.head
  head_dims = (
      [width]
      + [head.hidden_dim] * (head.num_layers - 1)
      + [head.bottleneck_dim, config.objective.bits.num_bits]
  )
  view = lambda size: common.vit_forward_flops(
      width, depth, size, config.model.patch_size, config.input.num_channels
  ) + common.mlp_flops(head_dims)
  return common.train_step_flops(config.input.batch_size, view, config.input.crops)


def peak_tflops(device, override: float | None) -> float | None:
  return override or common.bf16_peak_tflops(device)


# --------------------------------------------------------------------------- measure


def _bytes_per_device(tree, shardings) -> int:
  return int(
      sum(
          np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
          for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings))
      )
  )


def measure(config, devices, *, steps: int, repeats: int, peak: float | None) -> dict:
  step_fn, state, mesh, _ = common.jitted_step(config, devices)
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  batch = jax.device_put(common.synthetic_batch(config), sharding_lib.batch_sharding(mesh))

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  xla_flops = common.xla_flops(compiled) or float("nan")

  state, _ = compiled(state, batch)  # warm-up
  jax.block_until_ready(state)
  timings = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    timings.append((time.perf_counter() - t0) / steps)
  step_s = statistics.median(timings)

  device = mesh.devices.flat[0]
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak_bytes, memory_source = stats["peak_bytes_in_use"], "device peak"
  else:
    peak_bytes = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    memory_source = "XLA estimate"
  flops = train_step_flops(config)
  achieved = flops / step_s
  n = mesh.devices.size
  crops = config.input.crops
  return {
      "model": config.model.name,
      "devices": n,
      "mesh": dict(mesh.shape),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "batch_size": config.input.batch_size,
      "dtype": config.dtype,
      "remat": config.model.remat,
      "crops": f"{crops.num_global}x{crops.global_size}+{crops.num_local}x{crops.local_size}",
      "step_ms": 1e3 * step_s,
      "images_per_s": config.input.batch_size / step_s,
      "compile_s": compile_s,
      "memory_per_device_mib": peak_bytes / 2**20,
      "memory_source": memory_source,
      "state_per_device_mib": _bytes_per_device(shapes, state_sharding) / 2**20,
      "state_total_mib": (
          _bytes_per_device(
              shapes,
              jax.tree_util.tree_map(lambda s: sharding_lib.replicated(mesh), state_sharding),
          )
          / 2**20
      ),
      "analytic_gflop_per_step": flops / 1e9,
      # XLA counts the per-device program; on one device it is the whole step.
      "xla_gflop_per_step": xla_flops / 1e9 if n == 1 else None,
      "achieved_tflops": achieved / 1e12,
      "mfu": achieved / (peak * 1e12 * n) if peak else None,
      "loss": float(metrics["loss"]),
  }


def markdown_table(rows: list[dict]) -> str:
  head = (
      "| model | devices | mesh (data x fsdp) | images/s | ms/step | memory/device MiB "
      "| state/device MiB | GFLOP/step (analytic / XLA) | TFLOP/s | MFU |\n"
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  )
  lines = [head]
  for r in rows:
    xla = f"{r['xla_gflop_per_step']:.1f}" if r["xla_gflop_per_step"] else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    lines.append(
        f"| {r['model']} | {r['devices']} | {r['mesh']['data']} x {r['mesh']['fsdp']} "
        f"| {r['images_per_s']:.1f} | {r['step_ms']:.0f} | {r['memory_per_device_mib']:.0f} "
        f"({r['memory_source']}) | {r['state_per_device_mib']:.1f} "
        f"| {r['analytic_gflop_per_step']:.1f} / {xla} | {r['achieved_tflops']:.3f} | {mfu} |"
    )
  return "\n".join(lines)


def _measure_in_subprocess(args, model, n, kind, batch, recipe) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    command = (
        [
            sys.executable,
            os.path.abspath(__file__),
            "--models",
            model,
            "--devices",
            str(n),
            "--meshes",
            kind,
            "--batch_size",
            str(batch),
            "--recipe",
            recipe,
            "--steps",
            str(args.steps),
            "--repeats",
            str(args.repeats),
            "--isolate",
            "no",
            "--json",
            out,
        ]
        + (["--remat"] if args.remat else [])
        + (["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else [])
    )
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      return json.load(f)[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=["vit_tiny", "vit_small"])
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
  parser.add_argument(
      "--meshes",
      nargs="+",
      default=["data", "fsdp"],
      help="'data': (n x 1) pure data parallel; 'fsdp': (1 x n).",
  )
  parser.add_argument(
      "--recipe",
      choices=sorted(RECIPES),
      default=None,
      help="crops and dtype; default: 'cpu' on CPU, 'imagenet' elsewhere.",
  )
  parser.add_argument(
      "--batch_size",
      type=int,
      default=None,
      help="global batch; default 16 on CPU, 128 x devices elsewhere.",
  )
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument(
      "--peak_tflops",
      type=float,
      default=None,
      help="peak FLOP/s per device for MFU (default: bf16 table by device).",
  )
  parser.add_argument("--json", default=None, help="also write the rows to this file.")
  parser.add_argument(
      "--isolate",
      choices=("auto", "yes", "no"),
      default="auto",
      help=(
          "measure each case in a fresh process (auto: on GPU/TPU, where "
          "the device's peak memory counter only grows)."
      ),
  )
  args = parser.parse_args(argv)

  available = jax.devices()
  platform = available[0].platform
  recipe = args.recipe or ("cpu" if platform == "cpu" else "imagenet")
  peak = peak_tflops(available[0], args.peak_tflops)
  print(
      f"{len(available)} {platform} devices ({available[0].device_kind}); recipe "
      f"{recipe} {RECIPES[recipe]}; bf16 peak {peak} TFLOP/s per device",
      flush=True,
  )
  isolate = args.isolate == "yes" or (args.isolate == "auto" and platform != "cpu")
  rows = []
  for model in args.models:
    for n in args.devices:
      if n > len(available):
        print(f"skip {n} devices: only {len(available)}", flush=True)
        continue
      for kind in args.meshes:
        if n == 1 and kind == "fsdp":
          continue
        mesh = {"data": n, "fsdp": 1} if kind == "data" else {"data": 1, "fsdp": n}
        batch = args.batch_size or (16 if platform == "cpu" else 128 * n)
        if isolate:
          row = _measure_in_subprocess(args, model, n, kind, batch, recipe)
        else:
          config = bench_config(model, batch, recipe, mesh, args.remat)
          row = measure(config, available[:n], steps=args.steps, repeats=args.repeats, peak=peak)
        rows.append(row)
        print(json.dumps(row), flush=True)
  print()
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
