"""`optim`: the schedules (the teacher momentum's cosine and its end value) and the gradient clip."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from bits_jax import optim


@pytest.mark.parametrize("start,end", [(0.996, 1.0), (0.99, 0.999), (0.99, 0.99)])
def test_teacher_momentum_is_a_cosine_from_start_to_end(start, end):
  config = helpers.load_config("fashion_mnist", "test")
  config.total_steps = 100
  config.optim.teacher_momentum, config.optim.teacher_momentum_end = start, end
  momentum = optim.make_schedules(config).teacher_momentum
  for step in (0, 25, 50, 100):
    want = end - (end - start) * 0.5 * (1 + math.cos(math.pi * step / 100))
    np.testing.assert_allclose(float(momentum(step)), want, rtol=0, atol=1e-6)


def _dino_clip_gradients(grads: dict, clip: float) -> dict:
  """float64 numpy, DINO's `clip_gradients`: each tensor scaled by clip / (norm + 1e-6) if < 1."""
  out = {}
  for name, g in grads.items():
    g = np.float64(g)
    coef = clip / (np.linalg.norm(g) + 1e-6)
    out[name] = g * coef if coef < 1 else g
  return out


@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_per_tensor_clip_is_dinos(clip):
  rng = np.random.RandomState(0)
  grads = {"big": 5.0 * rng.randn(4, 3), "small": 0.01 * rng.randn(7), "mid": rng.randn(2, 2)}
  got = optim.clip_each_by_norm(clip).update(
      {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, optax.EmptyState()
  )[0]
  want = _dino_clip_gradients(grads, clip)
  for name in grads:
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-7)
  # The small tensor is untouched while the big one is cut to norm `clip`: a global-norm
  # clip would have scaled both by the same factor.
  np.testing.assert_array_equal(np.asarray(got["small"]), np.float32(grads["small"]))
  assert np.linalg.norm(np.asarray(got["big"])) == pytest.approx(clip, rel=1e-5)


@pytest.mark.parametrize("mode", ["per_tensor", "global"])
def test_clip_mode_picks_the_rule(mode):
  config = helpers.load_config("fashion_mnist", "test")
  config.optim.clip_norm, config.optim.clip_mode = 1.0, mode
  grads = {"a": jnp.full((4,), 1.0), "b": jnp.full((4,), 0.1)}  # norms 2 and 0.2
  clipped = optim.make_gradient_clip(config.optim).update(grads, optax.EmptyState())[0]
  scale_b = float(clipped["b"][0]) / 0.1
  # per tensor: b (norm 0.2 < 1) stays; global: the joint norm ~2.01 scales both by ~0.5.
  assert scale_b == pytest.approx(1.0 if mode == "per_tensor" else 1.0 / np.sqrt(4.04), rel=1e-4)


def test_unknown_clip_mode_names_the_options():
  config = helpers.load_config("fashion_mnist", "test")
  config.optim.clip_mode = "layer"
  with pytest.raises(ValueError, match="clip_mode='layer'.*per_tensor"):
    optim.make_gradient_clip(config.optim)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_mask_follows_dinos_rule(decay_embeddings):
  params = {
      "backbone": {
          "pos_embed": jnp.zeros((1, 4, 8)),
          "cls_token": jnp.zeros((1, 1, 8)),
          "block0": {"fc": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros((8,))}},
          "norm": {"scale": jnp.zeros((8,))},
      }
  }
  mask = optim.decay_mask(params, decay_embeddings)["backbone"]
  # DINO's get_params_groups: no decay for biases and 1-D params, decay for the rest.
  assert mask["block0"]["fc"] == {"kernel": True, "bias": False}
  assert mask["norm"]["scale"] is False
  assert mask["pos_embed"] is decay_embeddings and mask["cls_token"] is decay_embeddings


@pytest.mark.parametrize("start,end", [(0.04, 0.4), (0.0, 0.4), (0.1, 0.0), (0.05, 0.05)])
def test_weight_decay_is_a_cosine_from_start_to_end(start, end):
  config = helpers.load_config("fashion_mnist", "test")
  config.total_steps = 100
  config.optim.weight_decay, config.optim.weight_decay_end = start, end
  weight_decay = optim.make_schedules(config).weight_decay
  for step in (0, 25, 50, 100, 150):
    want = end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, 100) / 100))
    np.testing.assert_allclose(float(weight_decay(step)), want, rtol=0, atol=1e-6)
