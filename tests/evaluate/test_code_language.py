"""Tests for the code-language statistics and the 'codes' evaluator in bits_jax.evaluate.codes."""

import itertools
import os
import types

import ml_collections
import numpy as np
import pytest

from bits_jax.evaluate import codes


def _all_bytes(rng):
  """[256, 8] bool: every 8-bit pattern once, rows shuffled."""
  patterns = np.array(list(itertools.product([False, True], repeat=8)))
  return patterns[rng.permutation(256)]


def test_block_entropy_of_fair_bits_and_copies():
  rng = np.random.default_rng(0)
  fair = np.concatenate([_all_bytes(rng), _all_bytes(rng)], axis=1)  # 16 bits, uniform blocks.
  h, h_mm = codes.group_entropy(fair, codes.contiguous_groups(16, 8))
  np.testing.assert_allclose(h, [8.0, 8.0])
  np.testing.assert_allclose(h_mm, 8.0 + 255 / (2 * 256 * np.log(2)))
  one = np.repeat(np.arange(256) % 2 == 0, 1)[:, None]  # One fair bit ...
  copies = np.repeat(one, 16, axis=1)  # ... copied into all 16 bits.
  h, _ = codes.group_entropy(copies, codes.contiguous_groups(16, 8))
  np.testing.assert_allclose(h, [1.0, 1.0])
  h, _ = codes.group_entropy(copies, codes.random_groups(16, 8, seed=3))
  np.testing.assert_allclose(h, [1.0, 1.0])
  # Block 0: 8 copies of bit a; block 1: 8 copies of an independent bit b. A random
  # partition mixing a and b sees both: 2 bits; a pure group sees 1.
  a = np.tile([False, True], 128)
  b = np.repeat([False, True], 128)
  mixed = np.concatenate([np.repeat(a[:, None], 8, 1), np.repeat(b[:, None], 8, 1)], 1)
  groups = codes.random_groups(16, 8, seed=1)
  h, _ = codes.group_entropy(mixed, groups)
  pure = [(g < 8).all() or (g >= 8).all() for g in groups]
  np.testing.assert_allclose(h, np.where(pure, 1.0, 2.0))
  assert sorted(np.concatenate(groups).tolist()) == list(range(16))


def test_hamming_matrix_and_tsne_shapes():
  rng = np.random.default_rng(1)
  bits = rng.random((30, 12)) > 0.5
  want = (bits[:, None] != bits[None]).sum(-1)
  np.testing.assert_array_equal(codes.hamming_matrix(bits), want)
  emb, rows, kl = codes.tsne_codes(bits, num_points=20, seed=0, max_iter=250)
  assert emb.shape == (20, 3) and len(set(rows.tolist())) == 20 and np.isfinite(kl)


def _attribute_data(seed=0):
  """4 classes x 40 images, 3 bits: 0 = a shared attribute (moves descriptors along v in
  every class), 1 = noise, 2 = on for classes 0 and 1 only."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(4), 40)
  attribute = np.tile(np.arange(40) % 2 == 0, 4)
  noise = rng.random(160) > 0.5
  class_bit = labels < 2
  bits = np.stack([attribute, noise, class_bit], axis=1)
  v = np.eye(6)[5]
  desc = 3 * np.eye(6)[labels] + attribute[:, None] * v + rng.normal(size=(160, 6)) * 0.3
  return bits, labels, desc


def test_attribute_consistency_ranks_shared_attribute_first():
  bits, labels, desc = _attribute_data()
  score, count, direction = codes.attribute_consistency(bits, labels, desc)
  np.testing.assert_array_equal(count, [4, 4, 0])
  assert score[0] > 1.9 and score[1] < 1.6 and score[2] == 0  # sqrt(4) = 2 at most.
  assert direction[0, 5] > 0.95


def test_run_with_fake_context(tmp_path):
  bits, labels, desc = _attribute_data()
  logits = np.where(np.concatenate([bits, bits, bits[:, :2]], 1), 1.0, -1.0)  # 8 bits.
  images = np.zeros((160, 8, 8, 3), np.uint8)
  images[:, :, :, 0] = (np.arange(160) % 256)[:, None, None]
  feats = {"logits": logits, "cls": desc, "label": labels, "mask": np.ones(160, bool)}
  plots, asked = [], []

  def read_images(split, rows):
    asked.append(np.asarray(rows))
    return images[rows]

  ctx = types.SimpleNamespace(
      features=lambda split: feats,
      out_dir=str(tmp_path),
      add_plot=plots.append,
      mesh=None,
      step=0,
      num_classes=4,
      images=read_images,
  )
  got = codes.run(ctx, block_size=4, tsne_points=40, tsne_max_iter=250, top_bits=3, grid_bits=1)
  top = got["attribute_bits"].split(",")[0]
  assert top in ("0", "3", "6")  # Copies of bit 0.
  assert 0 < got["block_entropy_mean"] <= 4 and got["bit_entropy_mean"] > 0.9
  assert "label_entropy" in got and np.isfinite(got["tsne_kl"])
  names = sorted(os.path.basename(p) for p in plots)
  assert names == sorted([
      f"bit_{top}_grid.png",
      "bit_balance.png",
      "bit_correlation.png",
      "class_bit_activation.png",
      "codes_tsne.png",
  ])
  for p in plots:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # One read of only the shown images: <= 4 classes x (4 on + 4 off), all distinct.
  assert len(asked) == 1 and 0 < len(asked[0]) <= 32 and len(set(asked[0])) == len(asked[0])
  # Multi-hot labels: label statistics are left out; no files without out_dir.
  feats["label"] = np.eye(4, dtype=bool)[labels]
  ctx.out_dir, plots[:] = None, []
  multi = codes.run(ctx, block_size=4, tsne=False)
  assert "label_entropy" not in multi and "block_entropy_mean" in multi and not plots
  # Wider than max_bits: a BITS head is analysed, DINO's prototypes are refused.
  ctx.config = ml_collections.ConfigDict({"objective": {"name": "bits"}})
  assert "block_entropy_mean" in codes.run(ctx, block_size=4, tsne=False, max_bits=4)
  ctx.config.objective.name = "dino"
  with pytest.raises(ValueError, match="max_bits=4"):
    codes.run(ctx, block_size=4, tsne=False, max_bits=4)
