"""The ViT's attention kernel option: 'auto' (jax.nn.dot_product_attention) equals flax's."""

import jax
import numpy as np
import pytest

import helpers
from bits_jax import models
from bits_jax.models import vit

flax_attention = vit.attention_fn("xla")


def _vit(attention):
  return vit.ViT(width=16, depth=2, num_heads=2, patch_size=4, image_size=8, attention=attention)


def test_auto_kernel_matches_flax_attention():
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  params = _vit("xla").init(jax.random.PRNGKey(1), images)["params"]
  ref = _vit("xla").apply({"params": params}, images)
  out = _vit("auto").apply({"params": params}, images)
  for key in ("cls", "patch_tokens"):
    np.testing.assert_allclose(out[key], ref[key], rtol=1e-4, atol=1e-5)
  # Same gradients too: the kernel is a drop-in replacement inside the train step.
  weights = jax.random.normal(jax.random.PRNGKey(2), ref["cls"].shape)

  def loss(p, attention):  # not a plain sum: the final LayerNorm makes that gradient ~0
    return (_vit(attention).apply({"params": p}, images)["cls"] * weights).sum()

  g_ref, g_out = jax.grad(loss)(params, "xla"), jax.grad(loss)(params, "auto")
  leaves_ref, leaves_out = jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_out)
  # Absolute tolerance from the largest gradient: e.g. the key bias's is 0 up to rounding.
  scale = max(float(np.abs(a).max()) for a in leaves_ref)
  for a, b in zip(leaves_ref, leaves_out):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * scale)


def test_config_option_and_unknown_kernel():
  config = helpers.load_config("fashion_mnist", "test")
  assert "attention" in models.model_options("vit_small")
  config.model.attention = "auto"
  assert models.build_backbone(config).attention == "auto"
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    _vit("flash").init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))


@pytest.mark.parametrize("pad_to", [2, 8])
def test_padded_fused_attention_matches_unpadded(pad_to):
  # The padding path of the 'cudnn' kernel, run by XLA: 1 + 2 * 2 = 5 tokens, odd.
  q, k, v = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 5, 2, 8))
  ref = flax_attention(q, k, v)
  out = vit._fused_attention(q, k, v, implementation="xla", pad_to=pad_to)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  grad = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v) * v).sum(), argnums=(0, 1, 2))(q, k, v)
  padded = grad(lambda q, k, v: vit._fused_attention(q, k, v, implementation="xla", pad_to=pad_to))
  for a, b in zip(grad(flax_attention), padded):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
