"""Per-example ids and multi-hot labels of multi-label TFDS datasets in the eval stream."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from bits_jax import data
from bits_jax.data.sources import tfds as tfds_source
from tests import helpers

_LABELS = [[0, 2], [], [3], [1, 1, 3], [2], [0, 1, 2, 3], [3]]  # Objects' classes per image.


def _config(**overrides):
  """helpers.input_config with this file's crops; `overrides` are config.input keys."""
  return helpers.input_config(dict(global_size=8, local_size=8, num_local=0), **overrides)


class BitsTinyObjects(tfds.core.GeneratorBasedBuilder):
  """COCO-like: 8x8 RGB images with `objects/label` and `image/filename`, no 'label'."""

  VERSION = tfds.core.Version('1.0.0')
  # Test modules are not a package: tell TFDS where the builder "lives".
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'image/filename': tfds.features.Text(),
            'objects': tfds.features.Sequence({'label': tfds.features.ClassLabel(num_classes=4)}),
        })
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'test': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i, labels in enumerate(_LABELS):
      yield i, {
          'image': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
          'image/filename': f'img{i}.png',
          'objects': {'label': labels},
      }


def test_multi_label_tfds_eval_gives_multi_hot_labels_and_ids(tmp_path):
  config = _config(dataset='bits_tiny_objects', data_dir=str(tmp_path))
  info = data.get_dataset_info(config)
  assert info.multi_label and info.num_classes == 4
  seen = {}
  for process in range(2):
    for b in data.make_eval_iterator(
        config, 'test', process_index=process, process_count=2, with_ids=True
    ):
      assert b['label'].shape == (2, 4) and b['label'].dtype == bool
      assert not b['label'][~b['mask']].any() and set(b['id'][~b['mask']]) <= {''}
      seen.update(zip(b['id'][b['mask']], b['label'][b['mask']]))
  assert sorted(seen) == sorted(f'img{i}.png' for i in range(len(_LABELS)))
  for i, labels in enumerate(_LABELS):
    np.testing.assert_array_equal(seen[f'img{i}.png'], np.isin(np.arange(4), labels))
  ev = next(data.make_eval_iterator(config, 'test', process_index=0, process_count=1))
  assert set(ev) == {'image', 'label', 'mask'}  # Ids only when asked for.
  batch = next(
      data.make_train_iterator(
          _config(dataset='bits_tiny_objects', data_dir=str(tmp_path), train_split='test'),
          process_index=0,
          process_count=1,
      )
  )
  assert batch['label'].shape == (4, 4) and batch['global'].shape == (4, 2, 8, 8, 3)


def test_label_features_of_single_and_multi_label_datasets():
  features = tfds.features
  voc = features.FeaturesDict({
      'image': features.Image(shape=(None, None, 3)),
      'labels': features.Sequence(features.ClassLabel(num_classes=20)),
  })
  assert tfds_source._label_spec(voc, 'voc') == (('labels',), 20, True)
  single = features.FeaturesDict(
      {'image': features.Image(shape=(8, 8, 3)), 'label': features.ClassLabel(num_classes=5)}
  )
  assert tfds_source._label_spec(single, 'x') == (('label',), 5, False)
  with pytest.raises(ValueError, match="needs 'image' and a ClassLabel 'label'"):
    tfds_source._label_spec(features.FeaturesDict({'image': features.Image()}), 'x')


def test_npz_ids(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / 'ids.npz')
  np.savez(
      path,
      images=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
      labels=np.arange(4),
      test_images=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
      test_labels=np.arange(3),
      test_ids=np.array(['x', 'y', 'z']),
  )
  config = _config(dataset=f'npz:{path}', num_channels=1)
  ev = list(
      data.make_eval_iterator(config, 'test', process_index=0, process_count=1, with_ids=True)
  )
  assert list(ev[0]['id']) == ['x', 'y', 'z', '']
  ev = list(
      data.make_eval_iterator(config, 'train[1:]', process_index=1, process_count=2, with_ids=True)
  )
  assert list(ev[0]['id']) == ['2', '3']  # Indices in the base split, process 1's half.
