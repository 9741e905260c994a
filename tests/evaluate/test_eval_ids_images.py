"""Image ids and images through EvalContext: split files and Fig. 3 grids end to end (npz)."""

import jax
import numpy as np
import pytest

from bits_jax import sharding
from bits_jax import train_state
from bits_jax.evaluate import codes
from bits_jax.evaluate import common
from bits_jax.evaluate import features
from bits_jax.evaluate import linear
from bits_jax.evaluate import retrieval
from tests import helpers


@pytest.fixture(scope="module")
def npz_context(tmp_path_factory):
  """(EvalContext of the tiny test model on a 4-class npz file with string ids, its images
  [190, 28, 28] uint8, number of train images, tmp dir); features cached across tests."""
  tmp_path = tmp_path_factory.mktemp("npz")
  n, n_test = 150, 40
  rng = np.random.default_rng(0)
  labels = np.arange(n + n_test) % 4
  # Classes by brightness: crops and flips keep it, and a random-init ViT's CLS shows it.
  images = (rng.random((n + n_test, 28, 28)) * 40 + (labels * 60)[:, None, None]).astype(np.uint8)
  path = tmp_path / "tiny.npz"
  np.savez(
      path,
      images=images[:n],
      labels=labels[:n],
      ids=np.array([f"tr/{i:03d}.png" for i in range(n)]),
      test_images=images[n:],
      test_labels=labels[n:],
      test_ids=np.array([f"te/{i:03d}.png" for i in range(n_test)]),
  )
  config = helpers.load_config("fashion_mnist", "test")
  config.input.dataset = f"npz:{path}"
  config.input.eval_batch_size = 32
  mesh = sharding.make_mesh(config)
  components = train_state.build(config)
  init = jax.jit(lambda key: train_state.init_variables(components, key))  # Eager: 2x slower.
  params, batch_stats = init(jax.random.PRNGKey(0))
  variables = dict(params, **({"batch_stats": batch_stats} if batch_stats else {}))
  ctx = common.EvalContext(config, components, variables, mesh)
  return ctx, images, n, tmp_path


def test_features_ids_split_files_and_images(npz_context):
  ctx, images, n, tmp_path = npz_context
  train = ctx.features("train")
  assert len(train["id"]) == 160  # 150 rows padded to 5 batches of 32.
  assert list(train["id"][:3]) == ["tr/000.png", "tr/001.png", "tr/002.png"]
  assert set(train["id"][~train["mask"]]) == {""}
  assert list(ctx.features("test[2:5]")["id"][:3]) == ["te/002.png", "te/003.png", "te/004.png"]

  # Queries and database from split files (one id per line, extra fields ignored).
  queries = tmp_path / "queries.txt"
  queries.write_text("te/003.png 3\nte/000.png\nte/005.png\n")
  database = tmp_path / "database.txt"
  database.write_text("\n".join(f"tr/{i:03d}.png" for i in range(0, n, 2)) + "\n")
  got = retrieval.run(
      ctx,
      query_split_file=str(queries),
      database_split_file=str(database),
      ks=(1, 5),
      codes=False,
  )
  assert got["num_queries"] == 3 and got["num_database"] == 75
  # The same metric computed by hand on the selected rows.
  test = ctx.features("test")
  q, db = [3, 0, 5], slice(0, n, 2)
  want = retrieval.feature_retrieval(
      test["cls"][q], test["label"][q], train["cls"][db], train["label"][db], ks=(1, 5)
  )
  assert got["map_all"] == pytest.approx(want["map_all"], rel=1e-5)
  database.write_text("tr/000.png\ntr/999.png\ntr/998.png\n")
  with pytest.raises(ValueError, match=r"database.txt.*'tr/999.png'"):
    retrieval.run(ctx, database_split_file=str(database), codes=False)

  # The evaluation views of chosen rows, in the requested order, as the features saw them.
  rows = np.array([5, 1, 5, 0])
  got_images = ctx.images("train", rows)
  assert got_images.shape == (4, 28, 28, 1) and got_images.dtype == np.uint8
  np.testing.assert_array_equal(got_images[..., 0], images[rows])  # 28 px: no resize.
  np.testing.assert_allclose(
      ctx.normalize(got_images), ctx.normalize(images[rows][..., None]), atol=1e-6
  )
  with pytest.raises(ValueError, match="beyond the 160 feature rows"):
    ctx.images("train", [160])


def test_codes_grids_read_real_images(npz_context):
  ctx, _, _, tmp_path = npz_context
  ctx.out_dir = str(tmp_path / "figs")
  try:
    got = codes.run(ctx, split="train", tsne=False, grid_bits=2, grid_images=2, block_size=4)
  finally:
    ctx.out_dir = None
  grids = [p for p in ctx.plots if p.endswith("_grid.png")]
  assert got["attribute_bits"] and 1 <= len(grids) <= 2


def test_ids_travel_as_fixed_width_bytes():
  ids = ["a/0.png", "ünï/1.jpg", ""]
  np.testing.assert_array_equal(features.bytes_to_ids(features.ids_to_bytes(ids)), ids)
  with pytest.raises(ValueError, match="longer than 4 bytes"):
    features.ids_to_bytes(["abcde"], width=4)
  # Through a global array on the 8-device mesh, as between processes.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  words = features.ids_to_bytes([f"img{i}" for i in range(8)])
  from bits_jax import utils  # pylint: disable=g-import-not-at-top

  back = features.bytes_to_ids(utils.to_host(utils.to_global(words, spec)))
  assert list(back) == [f"img{i}" for i in range(8)]


def test_random_resized_crop_flip():
  images = np.random.default_rng(0).normal(size=(16, 8, 8, 2)).astype(np.float32)
  key = jax.random.key(0)
  whole = np.asarray(linear.random_resized_crop_flip(key, images, scale=(1, 1), ratio=(1, 1)))
  flipped = np.all(np.isclose(whole, images[:, :, ::-1], atol=1e-5), axis=(1, 2, 3))
  kept = np.all(np.isclose(whole, images, atol=1e-5), axis=(1, 2, 3))
  assert np.all(flipped | kept) and 0 < flipped.sum() < 16  # Whole image, some flipped.
  crops = np.asarray(linear.random_resized_crop_flip(key, images))
  assert crops.shape == images.shape and np.isfinite(crops).all()
  assert not np.any(np.all(np.isclose(crops, images, atol=1e-5), axis=(1, 2, 3)))


def test_augmented_probe_protocol_beats_chance(npz_context):
  ctx = npz_context[0]
  got = linear.run(
      ctx,
      protocol="augmented",
      epochs=10,
      mlp=True,
      hidden_dim=16,
      learning_rates=(0.03, 0.3),
      mlp_learning_rates=(0.03,),
      val_fraction=0.25,
  )
  # 4 brightness classes: chance is 0.25 on the 40 test images.
  assert got["linear_top1"] > 0.6 and got["mlp_top1"] > 0.6, got
  assert {"linear_val_top1_lr0.03", "linear_val_top1_lr0.3", "mlp_best_lr"} <= set(got)
  with pytest.raises(ValueError, match="unknown probe protocol"):
    linear.run(ctx, protocol="simdino")
