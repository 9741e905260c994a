"""The ViT's fixed 2-D sine-cosine position embedding (`posemb='sincos2d'`)."""

import jax
import numpy as np
import pytest

from bits_jax.models import vit


def _reference(rows: int, cols: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """float64 numpy: [rows * cols, dim], row-major tokens, (sin x, cos x, sin y, cos y)."""
  quarter = dim // 4
  freqs = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / (quarter - 1))
  out = np.zeros((rows * cols, dim))
  for r in range(rows):
    for c in range(cols):
      out[r * cols + c] = np.concatenate(
          [np.sin(c * freqs), np.cos(c * freqs), np.sin(r * freqs), np.cos(r * freqs)]
      )
  return out


def test_table_matches_float64_reference():
  table = np.asarray(vit.sincos_pos_embed_2d((3, 5), 16))
  assert table.shape == (1, 15, 16)
  np.testing.assert_allclose(table[0], _reference(3, 5, 16), atol=1e-5)
  # Every token gets its own position vector.
  assert len({row.tobytes() for row in table[0]}) == 15


def test_width_not_divisible_by_four_is_refused():
  with pytest.raises(ValueError, match="divisible by 4"):
    vit.sincos_pos_embed_2d((2, 2), 6)


def _vit(posemb):
  return vit.ViT(width=16, depth=1, num_heads=2, patch_size=4, image_size=8, posemb=posemb)


def test_fixed_embedding_has_no_parameter_and_serves_every_crop_size():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  model = _vit("sincos2d")
  params = model.init(jax.random.PRNGKey(1), images)["params"]
  assert (
      "pos_embed" not in params
      and "pos_embed" in _vit("learn").init(jax.random.PRNGKey(1), images)["params"]
  )
  # A global crop's tokens get the table itself; the position term is what separates two
  # models with the same weights.
  out = model.apply({"params": params}, images)
  assert out["patch_tokens"].shape == (2, 4, 16)
  learned = dict(params, pos_embed=vit.sincos_pos_embed_2d((2, 2), 16))
  same = _vit("learn").apply({"params": learned}, images)
  np.testing.assert_allclose(np.asarray(out["cls"]), np.asarray(same["cls"]), atol=1e-5)
  # A local crop (4 px, one token) runs through the same params.
  small = model.apply({"params": params}, images[:, :4, :4])
  assert small["patch_tokens"].shape == (2, 1, 16)


def test_unknown_posemb_names_the_options():
  with pytest.raises(ValueError, match="config.model.posemb='rope'.*'sincos2d'"):
    _vit("rope").init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))


def test_export_to_torch_layout_is_refused_with_the_reason():
  from bits_jax.models import torch_mapping  # pylint: disable=g-import-not-at-top

  images = np.zeros((1, 8, 8, 1), np.float32)
  params = _vit("sincos2d").init(jax.random.PRNGKey(0), images)["params"]
  with pytest.raises(ValueError, match="posemb='learn'"):
    torch_mapping.vit_to_torch(params)
