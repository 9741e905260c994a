"""Tests for bits_jax.evaluate.video and davis_metrics (DAVIS label propagation, J and F)."""

import io
import itertools
import math
import os

import numpy as np
from PIL import Image
import pytest

from bits_jax.evaluate import davis_metrics
from bits_jax.evaluate import video

_PATCH = 4
_H, _W = 32, 64  # landscape: resized to 32 x (64 // 64 * 64), the DINO geometry unchanged
_FRAMES = 6


def _synthetic_video(seed=0):
  """Two textured squares on a textured background; object 1 moves right, 2 moves down."""
  rng = np.random.default_rng(seed)
  frames, masks = [], []
  for t in range(_FRAMES):
    mask = np.zeros((_H, _W), np.uint8)
    mask[8:20, 4 + 4 * t : 16 + 4 * t] = 1
    mask[4 + 2 * t : 12 + 2 * t, 44:52] = 2
    colors = np.array([[40, 150, 40], [210, 40, 40], [40, 40, 210]], np.float32)
    frame = colors[mask] + rng.uniform(-25, 25, size=(_H, _W, 3))
    frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    masks.append(mask)
  return frames, masks


def _write_davis(root, name="square", frames=None, masks=None):
  frames, masks = (frames, masks) if frames is not None else _synthetic_video()
  for sub in ("JPEGImages", "Annotations"):
    os.makedirs(os.path.join(root, sub, "480p", name), exist_ok=True)
  for t, (frame, mask) in enumerate(zip(frames, masks)):
    # PNG frames saved under .jpg names keep the test lossless; PIL reads them by content.
    Image.fromarray(frame).save(
        os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}.jpg"), format="PNG"
    )
    ann = Image.fromarray(mask, mode="L").convert("P")
    ann.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253))
    ann.save(os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png"))
  os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
  with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w", encoding="utf-8") as f:
    f.write(name + "\n")
  return root


class _Ctx:
  """The parts of EvalContext the evaluator uses; features = patch colour means."""

  def __init__(self, out_dir=None, random_features=False):
    self.out_dir = out_dir
    self.patch_size = _PATCH
    self.plots = []
    self._rng = np.random.default_rng(1) if random_features else None

  def normalize(self, images):
    return np.asarray(images, np.float32) / 255.0

  def predict(self, images, outputs=("cls",)):
    assert outputs == ("patch_tokens",)
    n, h, w, c = images.shape
    grid = (h // _PATCH, w // _PATCH)
    if self._rng is not None:
      tokens = self._rng.normal(size=(n, grid[0] * grid[1], 8))
    else:
      tokens = images.reshape(n, grid[0], _PATCH, grid[1], _PATCH, c).mean(axis=(2, 4))
    return {"patch_tokens": tokens.reshape(n, grid[0] * grid[1], -1).astype(np.float32)}

  def add_plot(self, path):
    self.plots.append(path)


def test_propagation_with_informative_features_tracks_the_squares(tmp_path):
  root = _write_davis(str(tmp_path / "davis"))
  ctx = _Ctx(out_dir=str(tmp_path / "out"))
  got = video.run(ctx, data_dir=root)
  assert got["JF_mean"] > 0.9, got
  assert got["J_mean"] > 0.9 and got["F_mean"] > 0.9
  assert got["num_sequences"] == 1
  assert got["seq/square/JF"] == pytest.approx((got["seq/square/J"] + got["seq/square/F"]) / 2)
  assert got["seq/square/J"] == pytest.approx(got["J_mean"])  # one sequence
  assert len(ctx.plots) == 1 and os.path.isfile(ctx.plots[0])
  assert ctx.plots[0].startswith(os.path.join(str(tmp_path / "out"), "plots"))


def test_random_features_score_clearly_lower(tmp_path):
  root = _write_davis(str(tmp_path / "davis"))
  informative = video.run(_Ctx(), data_dir=root)["JF_mean"]
  random = video.run(_Ctx(random_features=True), data_dir=root)["JF_mean"]
  assert random < informative - 0.3, (random, informative)


def _reference_propagation(target, feats, labels, valid, grid, topk, radius, temperature):
  """DINO's formula, one target patch at a time."""
  h, w = grid
  out = np.zeros((h * w, labels.shape[-1]))
  for q in range(h * w):
    aff = []
    for m in range(feats.shape[0]):
      for s in range(h * w):
        near = abs(q // w - s // w) <= radius and abs(q % w - s % w) <= radius
        ok = valid[m] and (radius <= 0 or near)
        aff.append(math.exp(float(target[q] @ feats[m, s]) / temperature) if ok else 0.0)
    aff = np.array(aff)
    kth = np.sort(aff)[-topk]
    weights = np.where(aff >= kth, aff, 0.0)
    out[q] = (weights / weights.sum()) @ labels.reshape(-1, labels.shape[-1])
  return out


@pytest.mark.parametrize("radius", [1, 0])
def test_propagate_labels_matches_the_reference(radius):
  rng = np.random.default_rng(0)
  grid, m, dim, num_labels = (3, 4), 3, 5, 3
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  target = unit(rng.normal(size=(12, dim))).astype(np.float32)
  feats = unit(rng.normal(size=(m, 12, dim))).astype(np.float32)
  labels = rng.dirichlet(np.ones(num_labels), size=(m, 12)).astype(np.float32)
  valid = np.array([True, True, False])
  got = video.propagate_labels(
      target, feats, labels, valid, grid=grid, topk=3, neighborhood=radius, temperature=0.1, block=5
  )
  want = _reference_propagation(target, feats, labels, valid, grid, 3, radius, 0.1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_frame_size_follows_dino():
  assert video.frame_size(480, 854, patch_size=16) == (480, 832)
  assert video.frame_size(854, 480, patch_size=8) == (832, 480)
  assert video.frame_size(600, 1000, patch_size=16, short_side=480) == (480, 768)
  with pytest.raises(ValueError, match="multiples of the patch size"):
    video.frame_size(480, 854, patch_size=16, short_side=470)


# ----------------------------------------------------------------------------- J and F


def _reference_bmap(seg):
  h, w = seg.shape
  out = np.zeros_like(seg, bool)
  for y, x in itertools.product(range(h), range(w)):
    val = lambda yy, xx: seg[yy, xx] if yy < h and xx < w else False
    if y == h - 1 and x == w - 1:
      continue
    if y == h - 1:
      out[y, x] = seg[y, x] != val(y, x + 1)
    elif x == w - 1:
      out[y, x] = seg[y, x] != val(y + 1, x)
    else:
      out[y, x] = (
          seg[y, x] != seg[y, x + 1] or seg[y, x] != seg[y + 1, x] or seg[y, x] != seg[y + 1, x + 1]
      )
  return out


def _reference_f(pred, gt, radius):
  bp, bg = _reference_bmap(pred), _reference_bmap(gt)

  def matched(a, b):  # pixels of a with a pixel of b within the disk
    pts = np.argwhere(b)
    return sum(
        any((y - py) ** 2 + (x - px) ** 2 <= radius**2 for py, px in pts) for y, x in np.argwhere(a)
    )

  if not bp.any() and not bg.any():
    return 1.0
  if not bp.any() or not bg.any():
    return 0.0
  precision, recall = matched(bp, bg) / bp.sum(), matched(bg, bp) / bg.sum()
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _hand_masks():
  a = np.zeros((20, 24), bool)
  a[3:12, 4:15] = True
  a[14:18, 18:22] = True
  b = np.zeros((20, 24), bool)
  b[4:13, 5:13] = True
  b[15:20, 17:24] = True  # touches the bottom and right border
  c = np.zeros((20, 24), bool)
  c[0:20, 0:2] = True
  c[10, 10] = True
  return a, b, c, np.zeros((20, 24), bool)


def test_boundary_map_matches_the_reference():
  for mask in _hand_masks():
    np.testing.assert_array_equal(davis_metrics.seg2bmap(mask), _reference_bmap(mask))


@pytest.mark.parametrize("tolerance", [davis_metrics.BOUNDARY_TOLERANCE, 2, 3])
def test_j_and_f_match_the_reference(tolerance):
  masks = _hand_masks()
  radius = davis_metrics.boundary_radius(masks[0].shape, tolerance)
  assert radius == (1 if tolerance < 1 else tolerance)
  for pred, gt in itertools.product(masks, repeat=2):
    union = (pred | gt).sum()
    j_want = 1.0 if union == 0 else (pred & gt).sum() / union
    assert davis_metrics.region_iou(pred, gt) == pytest.approx(j_want)
    assert davis_metrics.boundary_f(pred, gt, tolerance) == pytest.approx(
        _reference_f(pred, gt, radius)
    ), (pred.sum(), gt.sum())


def test_frame_scores_and_summary():
  a, b, _, empty = _hand_masks()
  pred = a.astype(int) + 2 * (b & ~a)
  j, f = davis_metrics.frame_scores(pred, pred, num_objects=2)
  np.testing.assert_allclose(j, 1.0)
  np.testing.assert_allclose(f, 1.0)
  j, f = davis_metrics.frame_scores(empty.astype(int), pred, num_objects=2)
  np.testing.assert_allclose(j, 0.0)
  np.testing.assert_allclose(f, 0.0)
  got = davis_metrics.summarize(
      {"x": (np.array([1.0, 0.5]), np.array([0.5, 0.0])), "y": (np.array([0.0]), np.array([1.0]))}
  )
  assert got["J_mean"] == pytest.approx(0.5) and got["F_mean"] == pytest.approx(0.5)
  assert got["seq/x/JF"] == pytest.approx(0.5) and got["seq/y/JF"] == pytest.approx(0.5)
  assert got["seq/x/J"] == pytest.approx(0.75) and got["seq/x/F"] == pytest.approx(0.25)
  assert got["seq/y/J"] == pytest.approx(0.0) and got["seq/y/F"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad input


def test_missing_annotation_names_the_file(tmp_path):
  root = _write_davis(str(tmp_path))
  missing = os.path.join(root, "Annotations", "480p", "square", "00003.png")
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=missing):
    video.run(_Ctx(), data_dir=root)


def test_size_mismatch_names_the_files(tmp_path):
  frames, masks = _synthetic_video()
  masks[0] = np.zeros((_H, _W + 8), np.uint8)
  masks[0][2:6, 2:6] = 1
  root = _write_davis(str(tmp_path), frames=frames, masks=masks)
  with pytest.raises(ValueError, match="00000.jpg is 32x64 but the first annotation .*00000.png"):
    video.run(_Ctx(), data_dir=root)


def test_unknown_sequence_is_named(tmp_path):
  root = _write_davis(str(tmp_path))
  with pytest.raises(ValueError, match="unknown sequence 'nope'"):
    video.run(_Ctx(), data_dir=root, sequences=["nope"])
  os.remove(os.path.join(root, "ImageSets", "2017", "val.txt"))
  with pytest.raises(FileNotFoundError, match="val.txt"):
    video.run(_Ctx(), data_dir=root)
  with pytest.raises(ValueError, match="needs data_dir"):
    video.run(_Ctx())


# ----------------------------------------------------------------------------- TFDS davis


@pytest.fixture(scope="module")
def tfds_davis(tmp_path_factory):
  """(DAVIS directory, TFDS data_dir) of one synthetic video: the real `davis/480p` builder
  prepared offline from the directory (its own _generate_examples; the download skipped)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.video.davis import davis as davis_lib  # pylint: disable=g-import-not-at-top

  root = _write_davis(str(tmp_path_factory.mktemp("davis_dir")))

  class OfflineDavis(davis_lib.Davis, skip_registration=True):
    name = "davis"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation": self._generate_examples(epath.Path(root) / "ImageSets/2017/val.txt")}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  OfflineDavis(config="480p", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return root, data_dir


def test_tfds_davis_scores_as_the_directory(tfds_davis, tmp_path):
  root, data_dir = tfds_davis
  want = video.run(_Ctx(), data_dir=root)
  ctx = _Ctx(out_dir=str(tmp_path))
  got = video.run(ctx, tfds_name="davis/480p", tfds_data_dir=data_dir, sequences=["square"])
  assert got == want
  assert got["JF_mean"] > 0.9 and got["num_sequences"] == 1
  assert [os.path.basename(p) for p in ctx.plots] == ["davis_square.png"]


def test_tfds_davis_unknown_sequence_and_unprepared_builder(tfds_davis, tmp_path):
  _, data_dir = tfds_davis
  with pytest.raises(
      ValueError, match=r"unknown sequence 'nope': TFDS davis/480p validation has \['square'\]"
  ):
    video.run(_Ctx(), tfds_name="davis/480p", tfds_data_dir=data_dir, sequences=["nope"])
  with pytest.raises(FileNotFoundError, match="tfds build davis/480p .*or pass data_dir=<DAVIS"):
    video.run(_Ctx(), tfds_name="davis/480p", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="has no split 'test'"):
    video.run(_Ctx(), tfds_name="davis/480p", tfds_data_dir=data_dir, split="test")


def _encoded(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def test_encoded_sequence_errors_name_the_record():
  frames, masks = _synthetic_video()
  frames_b = [_encoded(f, "PNG") for f in frames]
  masks_b = [_encoded(m, "PNG") for m in masks]
  origin = "TFDS davis/480p validation"
  with pytest.raises(ValueError, match="video 'v' has 6 frames but 5 annotations"):
    video.encoded_sequence("v", frames_b, masks_b[:5], origin)
  seq = video.encoded_sequence("v", frames_b, masks_b, origin)
  np.testing.assert_array_equal(seq.read_annotation(2), masks[2])
  np.testing.assert_array_equal(seq.read_frame(2), frames[2])
  features_fn = lambda x: _Ctx().predict(x / 255.0, ("patch_tokens",))["patch_tokens"]
  bad = list(frames_b)
  bad[2] = _encoded(frames[2][:, :48], "PNG")
  with pytest.raises(ValueError, match=f"frame {origin} video 'v' frame 2 is 32x48 but"):
    video.evaluate_sequence(
        video.encoded_sequence("v", bad, masks_b, origin), features_fn, patch_size=_PATCH
    )
  bad = list(masks_b)
  bad[3] = _encoded(masks[3][:16], "PNG")
  with pytest.raises(ValueError, match=f"annotation {origin} video 'v' annotation 3 is 16x64"):
    video.evaluate_sequence(
        video.encoded_sequence("v", frames_b, bad, origin), features_fn, patch_size=_PATCH
    )
  bad[3] = b""
  with pytest.raises(ValueError, match="annotation 3 is empty"):
    video.evaluate_sequence(
        video.encoded_sequence("v", frames_b, bad, origin), features_fn, patch_size=_PATCH
    )
