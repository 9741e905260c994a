"""Image-folder and TFDS sources through the full pipeline (tiny generated data)."""

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from bits_jax import data
from bits_jax.data import sources
from tests import helpers


def _config(**overrides):
  """helpers.input_config with this file's crops; `overrides` are config.input keys."""
  return helpers.input_config(dict(global_size=16, local_size=8, num_local=1), **overrides)


def _open(config, split):
  return sources.get(config.input).open(split)


def _write_folder(root, n_per_class=6, corrupt=False):
  """Class folders 'cat'/'dog' of 30x40 PNGs and JPEGs; optionally a truncated JPEG."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(['cat', 'dog']):
    os.makedirs(os.path.join(root, name))
    for i in range(n_per_class):
      pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
      ext = 'png' if i % 2 else 'jpg'
      Image.fromarray(pixels).save(os.path.join(root, name, f'{i:02d}.{ext}'))
  broken = None
  if corrupt:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    broken = os.path.join(root, 'dog', '02b.jpg')  # 10th file overall: in 'train'.
    with open(broken, 'wb') as f:
      f.write(buffer.getvalue()[: len(buffer.getvalue()) // 3])
  return broken


def test_imagefolder_labels_splits_and_batches(tmp_path):
  _write_folder(str(tmp_path))
  config = _config(dataset=f'imagefolder:{tmp_path}')
  info = data.get_dataset_info(config)
  assert info.num_classes == 2 and info.image_shape == (None, None, 3)
  assert info.num_examples == {'train': 10, 'test': 2}  # Every 10th file held out.
  train = _open(config, 'train')
  assert list(train.labels) == [0] * 5 + [1] * 5
  batches = [
      next(it)
      for it in [data.make_train_iterator(config, process_index=0, process_count=1)]
      for _ in range(5)
  ]
  assert batches[0]['global'].shape == (4, 2, 16, 16, 3)
  assert batches[0]['local'].shape == (4, 1, 8, 8, 3)
  labels = np.concatenate([b['label'] for b in batches])
  assert sorted(labels[:10]) == [0] * 5 + [1] * 5
  ev = list(data.make_eval_iterator(config, 'test', process_index=0, process_count=1))
  assert len(ev) == 1 and list(ev[0]['mask']) == [True, True, False, False]


def test_imagefolder_split_subfolders(tmp_path):
  _write_folder(str(tmp_path / 'train'))
  _write_folder(str(tmp_path / 'val'), n_per_class=2)
  config = _config(dataset=f'imagefolder:{tmp_path}')
  assert data.get_dataset_info(config).num_examples == {'train': 12, 'val': 4}
  with pytest.raises(ValueError, match="no split 'test'.*'train', 'val'"):
    _open(config, 'test')


def test_imagefolder_corrupt_file_error_names_path(tmp_path):
  broken = _write_folder(str(tmp_path), corrupt=True)
  config = _config(dataset=f'imagefolder:{tmp_path}')
  it = data.make_train_iterator(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=f'corrupt image {broken}.*skip_corrupt_images') as error:
    for _ in range(6):  # Two epochs of 11 train files.
      next(it)
  assert '{{' not in str(error.value) and '[Op:' not in str(error.value)  # TF's wrapping


def test_imagefolder_skip_corrupt_counts(tmp_path):
  broken = _write_folder(str(tmp_path), corrupt=True)
  config = _config(dataset=f'imagefolder:{tmp_path}', skip_corrupt_images=True)
  split = _open(config, 'train')
  assert split.skipped == (broken,) and split.num_examples == 10
  assert sources.get(config.input).count_corrupt('train') == 1
  it = data.make_train_iterator(config, process_index=0, process_count=1)
  labels = np.concatenate([next(it)['label'] for _ in range(5)])
  assert sorted(labels[:10]) == [0] * 5 + [1] * 5


class BitsTinyImages(tfds.core.GeneratorBasedBuilder):
  """50 train / 13 test 20x20 RGB images whose label is their index."""

  VERSION = tfds.core.Version('1.0.0')
  # Test modules are not a package: tell TFDS where the builder "lives".
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(20, 20, 3)),
            'label': tfds.features.ClassLabel(num_classes=50),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(50, 0), 'test': self._generate_examples(13, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      yield i, {'image': rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), 'label': i}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A data_dir in which the builder is prepared on first use (no network)."""
  return str(tmp_path_factory.mktemp('tfds'))


def test_tfds_prepares_and_reports_info(tfds_dir):
  config = _config(dataset='bits_tiny_images', data_dir=tfds_dir)
  info = data.get_dataset_info(config)
  assert info.source == 'tfds' and info.num_classes == 50
  assert info.num_examples == {'train': 50, 'test': 13}
  assert info.image_shape == (20, 20, 3)
  with pytest.raises(ValueError, match="no split 'valid'.*'test', 'train'"):
    _open(config, 'valid')


def test_tfds_train_resume_across_unaligned_epochs(tfds_dir):
  # 2 processes x b=3 over 25-example shards: batches straddle epoch ends.
  config = _config(dataset='bits_tiny_images', data_dir=tfds_dir, batch_size=6)
  full = data.make_train_iterator(config, process_index=1, process_count=2)
  uninterrupted = [next(full) for _ in range(12)]  # 36 = 25 + 11 examples.
  labels = np.concatenate([b['label'] for b in uninterrupted])
  assert len(set(labels[:25])) == 25 and set(labels[25:]) <= set(labels[:25])
  assert not np.array_equal(labels[25:], labels[:11])  # Reshuffled per epoch.
  # Step 7 straddles the epoch end; step 9 starts 2 records into epoch 1.
  for start in (7, 9):
    resumed = data.make_train_iterator(config, start_step=start, process_index=1, process_count=2)
    for a in uninterrupted[start : start + 3]:
      b = next(resumed)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_tfds_batches_larger_than_an_epoch(tfds_dir):
  config = _config(
      dataset='bits_tiny_images', data_dir=tfds_dir, batch_size=64, crops=dict(num_local=0)
  )  # b = 32 > 25 examples per process and epoch.
  full = data.make_train_iterator(config, process_index=0, process_count=2)
  first, second = next(full), next(full)
  assert len(set(first['label'][:25])) == 25
  assert set(first['label'][25:]) <= set(first['label'][:25])
  resumed = next(data.make_train_iterator(config, start_step=1, process_index=0, process_count=2))
  for key in second:
    np.testing.assert_array_equal(second[key], resumed[key])


def test_tfds_processes_disjoint_and_covering(tfds_dir):
  config = _config(dataset='bits_tiny_images', data_dir=tfds_dir, batch_size=10)
  shards = []
  for process in range(2):
    it = data.make_train_iterator(config, process_index=process, process_count=2)
    shards.append(set(np.concatenate([next(it)['label'] for _ in range(5)])))
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(50))


def test_tfds_eval_every_example_once(tfds_dir):
  config = _config(dataset='bits_tiny_images', data_dir=tfds_dir, eval_batch_size=4)
  seen, counts = [], []
  for process in range(2):
    batches = list(data.make_eval_iterator(config, 'test', process_index=process, process_count=2))
    counts.append(len(batches))
    seen.extend(np.concatenate([b['label'][b['mask']] for b in batches]))
    assert batches[0]['image'].shape == (2, 16, 16, 3)
  assert counts == [4, 4] and sorted(seen) == list(range(13))


def test_tfds_eval_split_smaller_than_the_process_count(tfds_dir):
  # 3 examples over 4 processes: the last process's shard is empty (TFDS refuses to read it).
  config = _config(dataset='bits_tiny_images', data_dir=tfds_dir, eval_batch_size=4)
  seen = []
  for process in range(4):
    batches = list(
        data.make_eval_iterator(
            config, 'test[:3]', process_index=process, process_count=4, with_ids=True
        )
    )
    assert len(batches) == 1 and batches[0]['image'].shape == (1, 16, 16, 3)
    seen.extend(batches[0]['label'][batches[0]['mask']])
    assert list(batches[0]['mask']) == [process < 3]
  assert len(seen) == 3 and len(set(seen)) == 3
  with pytest.raises(ValueError, match="split 'test\\[:0\\]' of 'bits_tiny_images' is empty"):
    list(data.make_eval_iterator(config, 'test[:0]', process_index=0, process_count=1))
