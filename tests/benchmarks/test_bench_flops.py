"""The benchmarks' analytic model FLOPs against XLA's count, and --compiler_option parsing."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from bits_jax.models import heads
from bits_jax.models import vit

_BENCH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"
)


def _load(name):
  sys.path.insert(0, _BENCH)  # the scripts import their sibling `common`
  try:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(_BENCH, name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(_BENCH)
  return module


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("image,patch", [(16, 4), (32, 8)])
def test_vit_and_head_forward_flops_match_xla(image, patch):
  common = _load("common.py")
  width, depth, bits = 128, 2, 32
  backbone = vit.ViT(width=width, depth=depth, num_heads=4, patch_size=patch, image_size=image)
  head = heads.BitsHead(bits=bits, hidden_dim=128, bottleneck_dim=0, num_layers=3)
  images = jnp.zeros((4, image, image, 3))
  params = backbone.init(jax.random.PRNGKey(0), images)
  head_params = head.init(jax.random.PRNGKey(1), jnp.zeros((4, width)))
  forward = lambda p, h, x: head.apply(h, backbone.apply(p, x)["cls"])
  analytic = 4 * (
      common.vit_forward_flops(width, depth, image, patch, 3)
      + common.mlp_flops([width, 128, 128, bits])
  )
  # XLA also counts the elementwise work (softmax, GELU, LayerNorm): ~10% at width 128; a
  # wrong factor in the formula (2x, a missing layer) would land far outside.
  ratio = _xla_flops(forward, params, head_params, images) / analytic
  assert 1.0 <= ratio < 1.2, ratio


def test_compiler_option_parses_bools_and_ints():
  parse = _load("common.py").compiler_option
  assert parse("xla_cpu_use_onednn=true") == ("xla_cpu_use_onednn", True)
  assert parse("xla_cpu_enable_fast_math=False") == ("xla_cpu_enable_fast_math", False)
  assert parse("xla_cpu_prefer_vector_width=512") == ("xla_cpu_prefer_vector_width", 512)
  assert parse("xla_cpu_experimental_ynn_fusion_type=") == (
      "xla_cpu_experimental_ynn_fusion_type",
      "",
  )
