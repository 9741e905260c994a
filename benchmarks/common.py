"""Set-up shared by the train-step benchmarks (scaling, train_step, train_step_methods, ...).

Importing this module puts the repository root on `sys.path` (bits_jax and the `configs`
package), so scripts run as `python benchmarks/<name>.py` import it first. It does not
import JAX: a script that sets XLA_FLAGS does so before importing this module.
"""

from __future__ import annotations

import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Dense bfloat16 peak TFLOP/s per chip, by a substring of `device.device_kind` (first match).
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def bf16_peak_tflops(device) -> float | None:
  """The device's dense bfloat16 peak from `BF16_PEAK_TFLOPS`; None for a CPU or unknown."""
  if device.platform == "cpu":
    return None
  for name, tflops in BF16_PEAK_TFLOPS:
    if name.lower() in device.device_kind.lower():
      return tflops
  return None


def synthetic_batch(config, seed: int = 0) -> dict:
  """Gaussian multi-crop views: {'global': [b, G, S, S, C], 'local': [b, L, s, s, C]}."""
  rng = np.random.default_rng(seed)
  b, c, crops = config.input.batch_size, config.input.num_channels, config.input.crops
  batch = {
      "global": rng.standard_normal(
          (b, crops.num_global, crops.global_size, crops.global_size, c), np.float32
      )
  }
  if crops.num_local:
    batch["local"] = rng.standard_normal(
        (b, crops.num_local, crops.local_size, crops.local_size, c), np.float32
    )
  return batch


# --------------------------------------------------------------------------- options


def compiler_option(text: str) -> tuple[str, object]:
  """'NAME=VALUE' -> (NAME, VALUE) with 'true'/'false' as bools and digits as ints (XLA
  refuses the strings for its bool and int options)."""
  name, value = text.split("=", 1)
  if value.lower() in ("true", "false"):
    return name, value.lower() == "true"
  return name, int(value) if value.lstrip("-").isdigit() else value


def first_line(error: BaseException) -> str:
  """An error's type and first message line, cut to 120 characters (for tables and logs)."""
  text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
  return text[:120]


# ------------------------------------------------------------------------------ FLOPs


def vit_forward_flops(
    width: int, depth: int, image_size: int, patch: int, channels: int, mlp_ratio: float = 4.0
) -> float:
  """2 x multiply-adds of one ViT forward's matmuls on one image (qkv, out, MLP, attention)."""
  patches = (image_size // patch) ** 2
  tokens = patches + 1
  embed = 2 * patches * patch * patch * channels * width
  block = 2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width
  return embed + depth * block


def mlp_flops(dims) -> float:
  """2 x multiply-adds of a stack of dense layers of widths `dims` (input first), per row."""
  return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def train_step_flops(batch: int, view_flops, crops) -> float:
  """Model FLOPs of one step: teacher forward (global crops) + student forward + backward.

  `view_flops(size)`: one view's forward (backbone + head); the backward counts 2x forward.
  """
  global_views = crops.num_global * view_flops(crops.global_size)
  local_views = crops.num_local * view_flops(crops.local_size) if crops.num_local else 0.0
  return batch * (global_views + 3 * (global_views + local_views))


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (per device), if it reports one."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def xla_bytes(compiled) -> int | None:
  """XLA's estimate of a program's memory: arguments + outputs - donated aliases + temps."""
  try:
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
  except (AttributeError, NotImplementedError, TypeError):
    return None


# ---------------------------------------------------------------------------- builders


def jitted_step(config, devices):
  """The project's train step as the training loop builds it, on a mesh of `devices`.

  Returns (step, state, mesh, components): `step` is `train_step.compile_train_step` (jitted
  with the partition rules' state shardings, state donated), `state` the initial state
  created directly in those shardings.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from bits_jax import sharding  # pylint: disable=g-import-not-at-top
  from bits_jax import train_state  # pylint: disable=g-import-not-at-top
  from bits_jax import train_step  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config, devices)
  components = train_state.build(config)
  state_sharding = sharding.shardings_of(sharding.abstract_state(components, config, mesh))
  state = jax.jit(
      lambda: train_state.create(components, config, jax.random.PRNGKey(config.seed)),
      out_shardings=state_sharding,
  )()
  step = train_step.compile_train_step(components, config, mesh, state_sharding)
  return step, state, mesh, components
