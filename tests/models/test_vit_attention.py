"""The ViT's attention kernels: the fused (cuDNN) path equals flax's attention.

cuDNN needs an NVIDIA GPU; here its code path (padding to even length, masking, the 'auto'
choice) runs with XLA's implementation of `jax.nn.dot_product_attention` instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from bits_jax import models
from bits_jax.models import vit

flax_attention = vit.attention_fn("xla")


def _padded_xla_attention(query, key, value, bias=None, mask=None, **kwargs):
  return vit._fused_attention(
      query, key, value, bias, mask, implementation="xla", pad_to=2, dtype=kwargs.get("dtype")
  )


def _vit(attention):
  return vit.ViT(width=16, depth=2, num_heads=2, patch_size=4, image_size=8, attention=attention)


def test_auto_kernel_path_matches_flax_attention(monkeypatch):
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))  # 1 + 4 tokens: odd
  params = _vit("xla").init(jax.random.PRNGKey(1), images)["params"]
  weights = jax.random.normal(jax.random.PRNGKey(2), (4, 16))

  def outputs(attention):
    out = _vit(attention).apply({"params": params}, images)

    def loss(p):  # not a plain sum: the final LayerNorm makes that gradient ~0
      return (_vit(attention).apply({"params": p}, images)["cls"] * weights).sum()

    return out, jax.grad(loss)(params)

  ref, grads_ref = outputs("xla")
  monkeypatch.setattr(vit, "_cudnn_applies", lambda *_: True)
  monkeypatch.setattr(vit, "_cudnn_attention", _padded_xla_attention)
  out, grads = outputs("auto")
  for key in ("cls", "patch_tokens"):
    np.testing.assert_allclose(out[key], ref[key], rtol=1e-4, atol=1e-5)
  leaves_ref, leaves = jax.tree_util.tree_leaves(grads_ref), jax.tree_util.tree_leaves(grads)
  # Absolute tolerance from the largest gradient: e.g. the key bias's is 0 up to rounding.
  scale = max(float(np.abs(a).max()) for a in leaves_ref)
  for a, b in zip(leaves_ref, leaves):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.parametrize("pad_to", [2, 8])
def test_padded_fused_attention_matches_unpadded(pad_to):
  q, k, v = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 5, 2, 8))  # 5 tokens
  ref = flax_attention(q, k, v)
  out = vit._fused_attention(q, k, v, implementation="xla", pad_to=pad_to)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  grad = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v) * v).sum(), argnums=(0, 1, 2))(q, k, v)
  padded = grad(lambda q, k, v: vit._fused_attention(q, k, v, implementation="xla", pad_to=pad_to))
  for a, b in zip(grad(flax_attention), padded):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_auto_chooses_cudnn_only_on_nvidia_gpus_in_16_bit():
  assert vit._cudnn_applies("gpu", "NVIDIA H100 80GB HBM3", jnp.bfloat16)
  assert vit._cudnn_applies("gpu", "NVIDIA H200", jnp.float16)
  assert not vit._cudnn_applies("gpu", "NVIDIA H200", jnp.float32)
  assert not vit._cudnn_applies("gpu", "AMD Instinct MI300X", jnp.bfloat16)
  assert not vit._cudnn_applies("tpu", "TPU v5 lite", jnp.bfloat16)
  assert not vit._cudnn_applies("cpu", "cpu", jnp.bfloat16)


def test_config_option_and_unknown_kernel():
  config = helpers.load_config("fashion_mnist", "test")
  assert "attention" in models.model_options("vit_small")
  assert models.build_backbone(config).attention == "auto"
  config.model.attention = "xla"
  assert models.build_backbone(config).attention == "xla"
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    _vit("flash").init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))
