"""Train-step throughput: our jitted BITS step vs a PyTorch step of the same work, same run.

  nice -n 5 python benchmarks/train_step.py [--rows=vit_tiny_32_b64,vit_tiny_32_b256] \
      [--rounds=5] [--steps=2] [--no-torch_compile] [--compile_rows=...] [--dtype=auto] \
      [--compiler_option=xla_cpu_experimental_ynn_fusion_type=] [--json_out=rows.json]

On a GPU: `benchmarks/gpu_table.sh` (the device run, with its environment).

Rows (`--rows`, comma-separated; `all` for every one): ViT-T at 32 px, patch 4, local crops
of 16 px; ViT-S/16 and ViT-B/16 at 224 px, local crops of 96 px; multi-crop 2 global + 6
local, 256 bits, the paper's head (d -> 2048 -> 2048 -> 256), batch 64 or 256. For each row:
  * ours: the project's jitted train step (`build_jax_step`: AdamW, EMA teacher, BCE +
    coding rate, non-finite guard, head re-init `lax.cond`), on one device;
  * torch eager: `benchmarks/torch_reference.py` (same model, loss and update; the same
    initial weights), and torch.compile of its student and teacher where that works (a
    failure is reported in the table, not raised);
  * rounds: ours, eager, compiled, ours, ... each `--steps` steps after a warm-up step, with
    a big fp32 matmul (`jnp.dot`, and `torch.mm`) timed in every round, so load from other
    jobs hits every entry alike; the table gives medians over rounds (ratios: the median of
    the per-round ratios);
  * model FLOPs: analytic (matmuls of the ViT and head: teacher forward on the global crops
    + 3x forward for the student's forward and backward on all crops), next to XLA's count
    for the compiled step, as a fraction of the matmul peak measured in the same rounds.
On a GPU (`jax.default_backend() == 'gpu'`) the default dtype is bfloat16 (torch: autocast)
and the table adds MFU against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import common  # pylint: disable=g-import-not-at-top  # puts the repository on sys.path
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from bits_jax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_GLOBAL, NUM_LOCAL = 2, 6
# The paper's head: d -> 2048 -> 2048 -> 256 bit logits, no bottleneck.
BITS, HEAD_HIDDEN, HEAD_BOTTLENECK, HEAD_LAYERS = 256, 2048, 0, 3


@dataclasses.dataclass(frozen=True)
class Row:
  model: str  # a key of vit.VIT_SIZES
  image: int  # global crop size
  patch: int
  local: int  # local crop size
  batch: int
  channels: int = 3

  @property
  def name(self) -> str:
    return f"vit_{self.model}_{self.image}_b{self.batch}"


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """How both steps of a row run (the command line's options)."""

  dtype: str = "float32"  # 'float32' | 'bfloat16' (ours: config.dtype; torch: autocast)
  gelu_approximate: bool = False  # tanh GELU in both models (the paper's models: exact erf)
  attention: str = "auto"  # our ViT's attention kernel (config.model.attention)


ROWS = {
    r.name: r
    for r in (
        Row("tiny", 32, 4, 16, 64),
        Row("tiny", 32, 4, 16, 256),
        Row("small", 224, 16, 96, 32),  # fits a 24 GiB CPU host (b64 needs ~20 GiB)
        Row("small", 224, 16, 96, 64),
        Row("small", 224, 16, 96, 256),
        Row("base", 224, 16, 96, 64),
        Row("base", 224, 16, 96, 256),
    )
}
DEFAULT_ROWS = "vit_tiny_32_b64,vit_tiny_32_b256"


# ------------------------------------------------------------------------------ FLOPs


def train_step_flops(row: Row) -> float:
  """Model FLOPs of one step: teacher forward (global crops) + student forward + backward."""
  width, depth, _ = vit.VIT_SIZES[row.model]
  bottleneck = [HEAD_BOTTLENECK] if HEAD_BOTTLENECK else []  # 0: the paper's head, none
  head_dims = [width] + [HEAD_HIDDEN] * (HEAD_LAYERS - 1) + bottleneck + [BITS]
  view = lambda size: common.vit_forward_flops(
      width, depth, size, row.patch, row.channels
  ) + common.mlp_flops(head_dims)
  crops = argparse.Namespace(
      num_global=NUM_GLOBAL, global_size=row.image, num_local=NUM_LOCAL, local_size=row.local
  )
  return common.train_step_flops(row.batch, view, crops)


def available_host_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None


# ---------------------------------------------------------------------------- builders


def row_config(row: Row, options: StepOptions = StepOptions()):
  """The project's config of a row's step: the only function here that knows config keys."""
  # pylint: disable=g-import-not-at-top
  from bits_jax import config_defaults
  # pylint: enable=g-import-not-at-top
  config = config_defaults.base_config()
  config.dtype = options.dtype
  config.total_steps = 100_000
  config.mesh = {"data": 1, "fsdp": 1}
  config.model = {
      "name": f"vit_{row.model}",
      "patch_size": row.patch,
      "gelu_approximate": options.gelu_approximate,
      "attention": options.attention,
  }
  config.input.num_channels = row.channels
  config.input.batch_size = row.batch
  config.input.crops.update(
      dict(num_global=NUM_GLOBAL, num_local=NUM_LOCAL, global_size=row.image, local_size=row.local)
  )
  config.objective.name = "bits"
  config.objective.head.update(
      dict(hidden_dim=HEAD_HIDDEN, bottleneck_dim=HEAD_BOTTLENECK, num_layers=HEAD_LAYERS)
  )
  config.objective.bits.num_bits = BITS
  # BITS-reset as trained: the re-init branch is in the step; it never fires here.
  config.objective.head.reset_every_steps = 10_000
  config.optim.warmup_steps = 10
  return config


def build_jax_step(row: Row, views: dict, options: StepOptions = StepOptions()):
  """Our train step on one device through the project's API.

  Returns (jitted step, initial state, batch on the device, params as numpy for the PyTorch
  copy).
  """
  # pylint: disable=g-import-not-at-top
  from bits_jax import sharding
  # pylint: enable=g-import-not-at-top
  config = row_config(row, options)
  step, state, mesh, _ = common.jitted_step(config, jax.devices()[:1])
  params = jax.tree_util.tree_map(np.asarray, state.params)
  batch = jax.device_put(views, sharding.batch_sharding(mesh))
  return step, state, batch, params


def load_torch_reference():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
  spec = importlib.util.spec_from_file_location("benchmarks_torch_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_torch_step(
    ref, row: Row, views: dict, params, *, device: str, options: StepOptions = StepOptions()
):
  """(trainer, global crops, local crops) of the PyTorch reference with our weights."""
  import torch  # pylint: disable=g-import-not-at-top

  width, depth, heads = vit.VIT_SIZES[row.model]
  student = ref.make_student(
      image_size=row.image,
      patch_size=row.patch,
      channels=row.channels,
      width=width,
      depth=depth,
      num_heads=heads,
      bits=BITS,
      head_hidden_dim=HEAD_HIDDEN,
      head_bottleneck_dim=HEAD_BOTTLENECK,
      head_layers=HEAD_LAYERS,
      gelu_approximate=options.gelu_approximate,
  )
  ref.load_flax_params(student, params)
  trainer = ref.BitsTrainer(
      student.to(device), autocast_dtype=torch.bfloat16 if options.dtype == "bfloat16" else None
  )
  to_device = lambda crops: [c.to(device) for c in crops]
  return (
      trainer,
      to_device(ref.images_to_torch(views["global"])),
      to_device(ref.images_to_torch(views["local"])),
  )


# ----------------------------------------------------------------------------- runners


class JaxRunner:

  def __init__(self, step, state, batch):
    self.step, self.state, self.batch = step, state, batch

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps (dispatched back to back, one sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - t0) / steps


class TorchRunner:

  def __init__(self, trainer, global_crops, local_crops, device: str):
    self.trainer, self.global_crops, self.local_crops = trainer, global_crops, local_crops
    self.device = device

  def _sync(self):
    if self.device == "cuda":
      import torch  # pylint: disable=g-import-not-at-top

      torch.cuda.synchronize()

  def run(self, steps: int) -> float:
    self._sync()
    t0 = time.perf_counter()
    for _ in range(steps):
      self.trainer.step(self.global_crops, self.local_crops)
    self._sync()
    return (time.perf_counter() - t0) / steps


class MatmulPeak:
  """FLOP/s of a big square matmul (best of `repeats`), in jnp and in torch."""

  def __init__(self, gpu: bool, dtype: str):
    self.n = 8192 if gpu else 2048
    self.repeats = 20 if gpu else 3
    jdtype = jnp.dtype(dtype)
    key = jax.random.PRNGKey(1)
    self.a = jax.random.normal(key, (self.n, self.n), jdtype)
    self.b = jax.random.normal(jax.random.fold_in(key, 1), (self.n, self.n), jdtype)
    self.dot = jax.jit(jnp.dot)
    jax.block_until_ready(self.dot(self.a, self.b))
    self.torch_args = None
    try:
      import torch  # pylint: disable=g-import-not-at-top

      tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
      device = "cuda" if gpu else "cpu"
      self.torch_args = (
          torch.randn(self.n, self.n, dtype=tdtype, device=device),
          torch.randn(self.n, self.n, dtype=tdtype, device=device),
          device,
      )
    except ImportError:
      pass

  def jax_flops(self) -> float:
    best = float("inf")
    for _ in range(self.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(self.dot(self.a, self.b))
      best = min(best, time.perf_counter() - t0)
    return 2 * self.n**3 / best

  def torch_flops(self) -> float | None:
    if self.torch_args is None:
      return None
    import torch  # pylint: disable=g-import-not-at-top

    a, b, device = self.torch_args
    best = float("inf")
    for _ in range(self.repeats):
      if device == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      torch.mm(a, b)
      if device == "cuda":
        torch.cuda.synchronize()
      best = min(best, time.perf_counter() - t0)
    return 2 * self.n**3 / best


# ------------------------------------------------------------------------------- bench


def bench_row(row: Row, args, ref, peak: MatmulPeak, gpu: bool) -> dict:
  options, dtype = args.options, args.options.dtype
  views = common.synthetic_batch(row_config(row, options))
  print(
      f"\n== {row.name}: batch {row.batch}, 2 x {row.image} px + 6 x {row.local} px, {dtype}",
      flush=True,
  )
  t0 = time.perf_counter()
  step, state, batch, params = build_jax_step(row, views, options)
  compiled = step.lower(state, batch).compile(compiler_options=args.compiler_options or None)
  result = {
      "row": row.name,
      "model_flops": train_step_flops(row),
      "xla_flops": common.xla_flops(compiled),
      "errors": {},
  }
  # A CPU row that cannot fit is reported, not run into the OOM killer (the torch step keeps
  # about as many activations as ours).
  need, free = common.xla_bytes(compiled), available_host_bytes()
  if not gpu and need and free and need > 0.8 * free:
    message = f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available"
    print(f"skipped: {message}", flush=True)
    result["errors"] = {n: f"skipped: {message}" for n in ("ours", "torch_eager", "torch_compile")}
    return result
  runners = {"ours": JaxRunner(compiled, state, batch)}
  runners["ours"].run(1)
  print(f"ours: built, compiled and one step in {time.perf_counter() - t0:.1f} s", flush=True)
  if ref is not None:
    device = "cuda" if gpu else "cpu"
    compile_this = args.torch_compile and (
        not args.compile_rows or row.name in args.compile_rows.split(",")
    )
    variants = ["eager"] + (["compile"] if compile_this else [])
    for variant in variants:
      t0 = time.perf_counter()
      try:
        trainer, global_crops, local_crops = build_torch_step(
            ref,
            row,
            views,
            params,
            device=device,
            options=options,
        )
        if variant == "compile":
          trainer.compile()
        runner = TorchRunner(trainer, global_crops, local_crops, device)
        runner.run(1)  # warm-up (and, compiled, the compilation)
        runners[f"torch_{variant}"] = runner
        print(
            f"torch {variant}: built and one step in {time.perf_counter() - t0:.1f} s", flush=True
        )
      except Exception as e:  # pylint: disable=broad-except
        result["errors"][f"torch_{variant}"] = common.first_line(e)
        print(f"torch {variant} failed: {common.first_line(e)}", flush=True)
        if args.verbose:
          traceback.print_exc()
  seconds = {name: [] for name in runners}
  peaks, torch_peaks, loads = [], [], []
  for r in range(args.rounds):
    peaks.append(peak.jax_flops())
    torch_peak = peak.torch_flops()
    if torch_peak:
      torch_peaks.append(torch_peak)
    for name, runner in runners.items():
      seconds[name].append(runner.run(args.steps))
    loads.append(os.getloadavg()[0])
    print(
        f"round {r + 1}: "
        + ", ".join(f"{n} {row.batch / s[-1]:.1f} img/s" for n, s in seconds.items())
        + f"; jnp.dot {peaks[-1] / 1e9:.0f} GFLOP/s; load {loads[-1]:.1f}",
        flush=True,
    )
  result.update(seconds=seconds, peaks=peaks, torch_peaks=torch_peaks, loads=loads)
  return result


def summarize(result: dict, batch: int, device, dtype: str) -> dict:
  """Medians over rounds; ratios and peak fractions per round, then their median."""
  seconds = result.get("seconds", {})
  flops = result["model_flops"]
  out = {
      "row": result["row"],
      "gflop_step": flops / 1e9,
      "errors": result["errors"],
      "xla_gflop_step": (result["xla_flops"] or float("nan")) / 1e9,
  }
  if not seconds:  # skipped
    return dict(out, img_s={}, ratio={}, peak_fraction={}, achieved_gflops=None, mfu=None)
  ours = np.asarray(seconds["ours"])
  peaks = np.asarray(result["peaks"])
  out["img_s"] = {n: batch / statistics.median(s) for n, s in seconds.items()}
  out["ratio"] = {
      n: statistics.median(np.asarray(s) / ours) for n, s in seconds.items() if n != "ours"
  }
  out["peak_fraction"] = {
      n: statistics.median(flops / np.asarray(s) / peaks) for n, s in seconds.items()
  }
  out["achieved_gflops"] = flops / statistics.median(ours) / 1e9
  peak = (
      common.bf16_peak_tflops(device) if dtype == "bfloat16" and device.platform == "gpu" else None
  )
  out["mfu"] = (
      {n: flops / statistics.median(s) / (peak * 1e12) for n, s in seconds.items()}
      if peak
      else None
  )
  return out


def markdown(rows: list[dict], names: list[str], show_mfu: bool) -> str:
  pretty = {"ours": "ours", "torch_eager": "torch eager", "torch_compile": "torch.compile"}
  head = ["row"] + [f"{pretty[n]} img/s" for n in names]
  head += [f"ours / {pretty[n]}" for n in names if n != "ours"]
  head += ["model GFLOP/step", "XLA GFLOP/step"]
  head += [f"{pretty[n]} % of matmul peak" for n in names]
  if show_mfu:
    head += [f"{pretty[n]} MFU" for n in names]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["row"]]
    fmt = (
        lambda d, n, f: f.format(d[n])
        if n in d
        else (r["errors"].get(n, "n/a").split(":")[0] if n in r["errors"] else "n/a")
    )
    cells += [fmt(r["img_s"], n, "{:.1f}") for n in names]
    cells += [fmt(r["ratio"], n, "{:.2f}x") for n in names if n != "ours"]
    cells += [
        f"{r['gflop_step']:.1f}",
        f"{r['xla_gflop_step']:.1f} ({r['xla_gflop_step'] / r['gflop_step']:.2f}x)",
    ]
    cells += [fmt(r["peak_fraction"], n, "{:.0%}") for n in names]
    if show_mfu:
      cells += [fmt(r["mfu"] or {}, n, "{:.0%}") for n in names]
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"- {r['row']} {pretty[n]}: {e}" for r in rows for n, e in r["errors"].items()]
  return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--rows", default=DEFAULT_ROWS, help=f"comma-separated of {', '.join(ROWS)}, or 'all'"
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per entry per round")
  parser.add_argument(
      "--dtype",
      default="auto",
      choices=("auto", "float32", "bfloat16"),
      help="auto: bfloat16 on a GPU, else float32",
  )
  parser.add_argument(
      "--torch",
      default=True,
      action=argparse.BooleanOptionalAction,
      help="time the PyTorch reference (needs torch)",
  )
  parser.add_argument("--torch_compile", default=True, action=argparse.BooleanOptionalAction)
  parser.add_argument(
      "--compile_rows", default="", help="comma-separated rows for torch.compile (default: all)"
  )
  parser.add_argument(
      "--json_out", default="", help="write the rows' raw timings and summaries here, per row"
  )
  parser.add_argument(
      "--gelu_approximate",
      action="store_true",
      help="tanh GELU in both models (default: exact erf, as the paper's)",
  )
  parser.add_argument(
      "--attention",
      default="auto",
      choices=vit.ATTENTION_KERNELS,
      help=(
          "our ViT's attention kernel (config.model.attention): auto = cudnn on NVIDIA bf16,"
          " else xla"
      ),
  )
  parser.add_argument(
      "--compiler_option",
      action="append",
      default=[],
      metavar="NAME=VALUE",
      help=(
          "XLA option for our step's compilation, e.g. "
          "xla_cpu_experimental_ynn_fusion_type= (XLA's own dot emitter instead of YNNPACK)"
      ),
  )
  parser.add_argument("--verbose", action="store_true", help="tracebacks of torch failures")
  args = parser.parse_args(argv)
  args.compiler_options = dict(common.compiler_option(o) for o in args.compiler_option)
  names = list(ROWS) if args.rows == "all" else args.rows.split(",")
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    parser.error(f"unknown --rows {unknown}: use {', '.join(ROWS)} or 'all'.")
  gpu = jax.default_backend() == "gpu"
  dtype = ("bfloat16" if gpu else "float32") if args.dtype == "auto" else args.dtype
  args.options = StepOptions(dtype, args.gelu_approximate, args.attention)
  device = jax.devices()[0]
  ref = None
  if args.torch:
    try:
      ref = load_torch_reference()
    except ImportError as e:
      print(f"PyTorch unavailable ({e}): timing ours only.")
  threads = ""
  if ref is not None:
    import torch  # pylint: disable=g-import-not-at-top

    threads = f", torch {torch.__version__} with {torch.get_num_threads()} threads"
  print(
      f"device: {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
      f"jax {jax.__version__}{threads}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
      f"our compiler options {args.compiler_options}, attention {args.attention!r}; "
      f"load average {os.getloadavg()}",
      flush=True,
  )
  peak = MatmulPeak(gpu, dtype)
  results, summaries = [], []
  for name in names:
    try:
      results.append(bench_row(ROWS[name], args, ref, peak, gpu))
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: the next row
      print(f"{name} failed: {common.first_line(e)}", flush=True)
      errors = {"ours": common.first_line(e)}
      results.append(
          dict(row=name, model_flops=train_step_flops(ROWS[name]), xla_flops=None, errors=errors)
      )
    summaries.append(summarize(results[-1], ROWS[name].batch, device, dtype))
    if args.json_out:  # per row, so a run stopped at its time limit keeps what it measured
      with open(args.json_out, "w") as f:
        json.dump(
            dict(
                device=device.device_kind,
                **dataclasses.asdict(args.options),
                results=results,
                summaries=summaries,
            ),
            f,
            indent=1,
            default=float,
        )
    if ref is not None and gpu:  # the next row's allocations need the memory torch cached
      import torch  # pylint: disable=g-import-not-at-top

      torch.cuda.empty_cache()
  entries = ["ours"] + [
      n
      for n in ("torch_eager", "torch_compile")
      if any(n in r.get("seconds", {}) or n in r["errors"] for r in results)
  ]
  all_peaks = [p for r in results for p in r.get("peaks", [])] or [float("nan")]
  torch_peaks = [p for r in results for p in r.get("torch_peaks", [])]
  loads = [x for r in results for x in r.get("loads", [])] or [os.getloadavg()[0]]
  print(
      f"\n{time.strftime('%Y-%m-%d')}, {device.device_kind}, {dtype}, "
      f"{args.rounds} rounds x {args.steps} steps, load average "
      f"{min(loads):.1f}-{max(loads):.1f} during the rounds"
  )
  print(
      f"matmul peak ({peak.n}^3 {dtype}, best of {peak.repeats}, median over rounds): "
      f"jnp.dot {statistics.median(all_peaks) / 1e9:.0f} GFLOP/s"
      + (f", torch.mm {statistics.median(torch_peaks) / 1e9:.0f} GFLOP/s" if torch_peaks else "")
  )
  show_mfu = any(r["mfu"] for r in summaries)
  if show_mfu:
    print(
        f"MFU against {common.bf16_peak_tflops(device):.0f} TFLOP/s dense bf16"
        f" ({device.device_kind})"
    )
  print(markdown(summaries, entries, show_mfu=show_mfu))


if __name__ == "__main__":
  main()
