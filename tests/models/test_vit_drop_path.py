"""Stochastic depth in the ViT: only with train=True and a 'drop_path' rng, params unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from bits_jax import models
from bits_jax.models import vit


def _vit(rate, **kw):
  return vit.ViT(
      width=16, depth=3, num_heads=2, patch_size=4, image_size=8, drop_path_rate=rate, **kw
  )


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3))


@pytest.fixture(scope="module")
def params(images):
  return _vit(0.0).init(jax.random.PRNGKey(1), images)["params"]


def _cls(rate, params, images, **kw):
  return np.asarray(_vit(rate).apply({"params": params}, images, **kw)["cls"])


def test_parameter_tree_unchanged_by_rate(images, params):
  dropped = _vit(0.5).init(jax.random.PRNGKey(1), images, train=True)["params"]
  assert jax.tree_util.tree_structure(dropped) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, dropped, params)


def test_no_rng_or_eval_is_exact(images, params):
  reference = _cls(0.0, params, images)
  # The teacher / evaluation paths: train=True without the rng, or train=False with it.
  np.testing.assert_array_equal(_cls(0.5, params, images, train=True), reference)
  rngs = {"drop_path": jax.random.PRNGKey(3)}
  np.testing.assert_array_equal(_cls(0.5, params, images, train=False, rngs=rngs), reference)
  # Rate 0 with the rng: nothing dropped either.
  np.testing.assert_array_equal(_cls(0.0, params, images, train=True, rngs=rngs), reference)


def test_drops_per_sample_with_rng(images, params):
  same = jnp.broadcast_to(images[:1], images.shape)  # one image, repeated
  reference = _cls(0.0, params, same)
  outs = [
      _cls(0.5, params, same, train=True, rngs={"drop_path": jax.random.PRNGKey(k)})
      for k in range(4)
  ]
  for out in outs:
    # Samples of one batch get their own masks: the copies of one image come out different.
    assert len({row.tobytes() for row in out}) > 1
  # Over the draws, some samples differ from the undropped model and keys matter.
  assert any(not np.allclose(out, reference) for out in outs)
  assert not np.array_equal(outs[0], outs[1])


def test_remat_draws_the_same_masks(images, params):
  rngs = {"drop_path": jax.random.PRNGKey(5)}
  plain = _cls(0.5, params, images, train=True, rngs=rngs)
  remat = vit.ViT(
      width=16, depth=3, num_heads=2, patch_size=4, image_size=8, drop_path_rate=0.5, remat=True
  )
  out = remat.apply({"params": params}, images, train=True, rngs=rngs)["cls"]
  np.testing.assert_allclose(np.asarray(out), plain, rtol=1e-5, atol=1e-5)


def test_drop_path_keeps_the_expectation():
  rate, n = 0.5, 40_000
  x = jnp.broadcast_to(jnp.arange(1.0, 4.0), (n, 2, 3))
  dropped = np.asarray(vit.drop_path(x, rate, jax.random.PRNGKey(0)))
  kept = dropped[:, 0, 0] != 0
  # Whole samples are dropped or kept (scaled by 1 / (1 - rate)).
  np.testing.assert_allclose(dropped[kept], np.asarray(x[kept]) / (1 - rate), rtol=1e-6)
  assert not dropped[~kept].any()
  # Keep fraction ~ 1 - rate; the mean over samples ~ x (std of the mean ~ 0.005 x here).
  assert abs(kept.mean() - (1 - rate)) < 0.02
  np.testing.assert_allclose(dropped.mean(axis=0), np.asarray(x[0]), rtol=0.03)


def test_config_option_and_bad_rate():
  assert "drop_path_rate" in models.model_options("vit_base")
  assert "drop_path_rate" in models.model_options("vit")
  config = helpers.load_config("fashion_mnist", "test")
  config.model.drop_path_rate = 0.1
  assert models.build_backbone(config).drop_path_rate == 0.1
  with pytest.raises(ValueError, match="drop_path_rate"):
    _vit(1.0).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
