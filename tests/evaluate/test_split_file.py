"""Tests for bits_jax.evaluate.split_file."""

import numpy as np
import pytest

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
