"""Tests for bits_jax.evaluate.features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bits_jax.evaluate import features


@jax.jit
def _apply(images):
  return {
      "embedding": images.mean(axis=(1, 2)),  # [b, C]
      "logits": images.reshape(images.shape[0], -1)[:, :5] * 2.0,
  }


def _batches(n_batches, b, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(n_batches):
    yield {
        "image": rng.normal(size=(b, 4, 4, 3)).astype(np.float32),
        "label": np.arange(i * b, (i + 1) * b, dtype=np.int32),
        "mask": np.arange(b) < (b - i),
    }


def test_concatenates_outputs_labels_and_masks():
  out = features.extract_features(_apply, _batches(3, 8))
  images = np.concatenate([b["image"] for b in _batches(3, 8)])
  assert sorted(out) == ["embedding", "label", "logits", "mask"]
  # XLA and numpy sum in different orders: means near 0 differ by ~1e-8 absolute (AVX2 host).
  np.testing.assert_allclose(out["embedding"], images.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["logits"], images.reshape(24, -1)[:, :5] * 2)
  np.testing.assert_array_equal(out["label"], np.arange(24))
  assert out["mask"].dtype == bool and out["mask"].sum() == 8 + 7 + 6
  assert all(isinstance(v, np.ndarray) for v in out.values())


def test_mesh_sharded_batches_match_unsharded():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  plain = features.extract_features(_apply, _batches(2, 16))
  sharded = features.extract_features(_apply, _batches(2, 16), mesh=mesh)
  for name in plain:
    np.testing.assert_allclose(sharded[name], plain[name], rtol=1e-6)


def test_accepts_jax_arrays_and_missing_mask():
  batches = [{"image": jnp.ones((4, 2, 2, 3)), "label": jnp.arange(4)}]
  out = features.extract_features(_apply, batches)
  assert out["mask"].all() and out["mask"].shape == (4,)
  np.testing.assert_array_equal(out["label"], np.arange(4))


def test_bad_inputs_raise_clear_errors():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  with pytest.raises(ValueError, match="multiple of the device count"):
    features.extract_features(_apply, _batches(1, 6), mesh=mesh)
  with pytest.raises(ValueError, match="expected 'image', 'label'"):
    features.extract_features(_apply, [{"images": np.ones((2, 2, 2, 3))}])
  with pytest.raises(ValueError, match="yielded no batches"):
    features.extract_features(_apply, [])
  with pytest.raises(ValueError, match="clashes with the batch field"):
    features.extract_features(lambda x: {"label": x}, _batches(1, 2))
