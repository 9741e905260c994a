"""Channel conversion (issue 15), `sources.check` and a source added through the registry."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bits_jax import data
from bits_jax.data import sources
from bits_jax.data.sources import core
from tests import helpers


def _config(**overrides):
  """helpers.input_config with this file's crops; `overrides` are config.input keys."""
  return helpers.input_config(dict(global_size=16, local_size=8, num_local=1), **overrides)


def _rgb_folder(root, n_per_class=5):
  """Class folders 'a'/'b' of 30x40 RGB PNGs (the first test file is a/00.png)."""
  rng = np.random.default_rng(0)
  for name in ('a', 'b'):
    os.makedirs(os.path.join(root, name))
    for i in range(n_per_class):
      pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, name, f'{i:02d}.png'))


def test_rgb_folder_with_one_channel_config_is_converted(tmp_path, caplog):
  _rgb_folder(str(tmp_path))
  config = _config(dataset=f'imagefolder:{tmp_path}', num_channels=1)
  assert data.get_dataset_info(config).channels == 3  # As stored.
  with caplog.at_level(logging.WARNING):
    batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
    ev = list(
        data.make_eval_iterator(config, 'test', process_index=0, process_count=1, with_ids=True)
    )
  assert batch['global'].shape == (4, 2, 16, 16, 1) and batch['local'].shape == (4, 1, 8, 8, 1)
  assert ev[0]['image'].shape == (4, 16, 16, 1) and ev[0]['id'][0] == 'a/00.png'
  converting = [r for r in caplog.records if 'converting RGB -> grayscale' in r.getMessage()]
  assert len(converting) == 1 and 'num_channels=1' in converting[0].getMessage()
  # Eval of a/00.png: luma of the stored RGB, central 30x30 resized to 16, normalized by 0.5.
  rgb = np.asarray(Image.open(os.path.join(tmp_path, 'a', '00.png')))
  gray = tf.image.rgb_to_grayscale(rgb)[:, 5:35]
  expected = tf.clip_by_value(tf.image.resize(gray, [16, 16], 'bicubic') / 255, 0, 1)
  np.testing.assert_allclose(ev[0]['image'][0], (expected.numpy() - 0.5) / 0.5, atol=1e-5)


def test_gray_arrays_with_three_channel_config_are_repeated(tmp_path):
  gray = np.random.default_rng(0).integers(0, 256, (10, 16, 16), dtype=np.uint8)
  path = str(tmp_path / 'gray.npz')
  np.savez(path, images=gray, labels=np.arange(10))
  config = _config(dataset=f'npz:{path}', num_channels=3)
  batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
  assert batch['global'].shape == (4, 2, 16, 16, 3)
  ev = next(data.make_eval_iterator(config, 'train', process_index=0, process_count=1))
  np.testing.assert_array_equal(ev['image'][..., 0], ev['image'][..., 2])
  np.testing.assert_allclose(ev['image'][0, ..., 1], (gray[0] / 255 - 0.5) / 0.5, atol=1e-5)


def test_other_channel_mismatch_names_the_fix(tmp_path):
  path = str(tmp_path / 'rgba.npz')
  np.savez(path, images=np.zeros((10, 8, 8, 4), np.uint8), labels=np.arange(10))
  with pytest.raises(ValueError, match='have 4 channels.*num_channels=3.*num_channels=4'):
    data.make_train_iterator(_config(dataset=f'npz:{path}'), process_index=0, process_count=1)
  with pytest.raises(ValueError, match='have 4 channels.*num_channels=1'):
    data.make_eval_iterator(
        _config(dataset=f'npz:{path}', num_channels=1), 'train', process_index=0, process_count=1
    )
  # 4 stored channels and num_channels=4: fed as stored.
  batch = next(
      data.make_train_iterator(
          _config(dataset=f'npz:{path}', num_channels=4), process_index=0, process_count=1
      )
  )
  assert batch['global'].shape == (4, 2, 16, 16, 4)


def test_check_reports_problems_with_the_fix(tmp_path):
  assert sources.check(_config(dataset=f'imagefolder:{tmp_path}').input) is None
  assert sources.check(_config(dataset='cifar10').input) is None
  assert 'unknown dataset' in sources.check(_config(dataset='foo:bar').input)
  assert "did you mean 'cifar10'" in sources.check(_config(dataset='cifar10o').input)
  problem = sources.check(_config(dataset=f'npz:{tmp_path}/missing.npz').input)
  assert 'does not exist' in problem and 'npz:/path/file.npz' in problem
  assert 'does not exist' in sources.check(_config(dataset='idx:/no/such/dir').input)


@core.register('tinyconst')
class _ConstantSource(core.DataSource):
  """'tinyconst:N': N constant 12x12 gray images whose value and label are the index."""

  def open(self, split):
    n = int(self.arg)
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 12, 12, 1))
    index = core.slice_indices(split, n)
    return core.ArraySplit(np.ascontiguousarray(images[index]), index, index, name=split)

  def info(self):
    return core.DatasetInfo(
        name=self.dataset,
        num_classes=int(self.arg),
        num_examples={'train': int(self.arg)},
        image_shape=(12, 12, 1),
        source=self.kind,
    )


def test_a_registered_source_feeds_the_streams():
  config = _config(dataset='tinyconst:8', num_channels=1, crops=dict(num_local=0))
  assert data.get_dataset_info(config).num_classes == 8
  labels = np.concatenate([
      b['label']
      for b, _ in zip(data.make_train_iterator(config, process_index=0, process_count=1), range(2))
  ])
  assert sorted(labels) == list(range(8))
  ev = list(
      data.make_eval_iterator(config, 'train[:6]', process_index=0, process_count=1, with_ids=True)
  )
  assert [list(b['id']) for b in ev] == [['0', '1', '2', '3'], ['4', '5', '', '']]
