"""Tests for bits_jax.evaluate.split_file."""

import types

import numpy as np
import pytest

from bits_jax.evaluate import retrieval
from bits_jax.evaluate import split_file


def test_read_and_select(tmp_path):
  path = tmp_path / "split.txt"
  path.write_text("# FPPQ-style queries\n\nb.jpg 3\n  a.jpg\n# end\nd.jpg\n")
  ids = split_file.read_split_file(str(path))
  assert ids == ["b.jpg", "a.jpg", "d.jpg"]
  dataset = np.array([b"a.jpg", b"b.jpg", b"c.jpg", b"d.jpg"], object)
  np.testing.assert_array_equal(split_file.select_by_ids(dataset, ids), [1, 0, 3])


def test_missing_duplicate_and_empty_raise():
  with pytest.raises(ValueError, match=r"2 of 4 ids .* first being 'x\.jpg'"):
    split_file.select_by_ids(["a.jpg", "b.jpg"], ["a.jpg", "x.jpg", "b.jpg", "y.jpg"])
  with pytest.raises(ValueError, match="listed twice"):
    split_file.select_by_ids(["a.jpg", "b.jpg"], ["a.jpg", "a.jpg"])
  with pytest.raises(ValueError, match="appears twice in the dataset"):
    split_file.select_by_ids(["a.jpg", "a.jpg"], ["a.jpg"])


def test_empty_file(tmp_path):
  path = tmp_path / "empty.txt"
  path.write_text("# nothing\n\n")
  with pytest.raises(ValueError, match="no ids"):
    split_file.read_split_file(str(path))


def test_class_lists_select_imagenet_style_ids(tmp_path):
  ids = ["n01/a.JPEG", "n02_5.JPEG", "n01_7.JPEG", "n03/x.JPEG", "n02/b.JPEG"]
  assert split_file.class_of_id(b"n02_5.JPEG") == "n02"
  np.testing.assert_array_equal(split_file.select_by_classes(ids, ["n03", "n01"]), [0, 2, 3])
  with pytest.raises(ValueError, match=r"1 of 2 classes .* first being 'n09'"):
    split_file.select_by_classes(ids, ["n01", "n09"])
  # Through the retrieval evaluator: a class list restricts queries and database.
  rng = np.random.default_rng(0)
  feats = {
      "cls": rng.normal(size=(6, 4)).astype(np.float32),
      "label": np.array([0, 1, 0, 2, 1, 0]),
      "mask": np.array([True] * 5 + [False]),
      "id": np.array(ids + [""]),
  }
  ctx = types.SimpleNamespace(features=lambda split: feats, out_dir=None, mesh=None)
  classes = tmp_path / "imagenet100.txt"
  classes.write_text("n01\nn02\n")
  got = retrieval.run(
      ctx, query_classes_file=str(classes), database_classes_file=str(classes), codes=False
  )
  assert got["num_queries"] == 4 and got["num_database"] == 4
  classes.write_text("n01\nn07\n")
  with pytest.raises(ValueError, match=r"imagenet100.txt against split 'test'.*'n07'"):
    retrieval.run(ctx, query_classes_file=str(classes), codes=False)
