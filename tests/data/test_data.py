"""Tests of the input pipeline on tiny generated data and the Fashion-MNIST IDX files."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from bits_jax import data
from bits_jax.data import augment
from bits_jax.data import prefetch
from bits_jax.data import sources
from tests import helpers

IDX_DIR = '/usr/share/datasets/fashion-mnist'


def _config(seed=0, **overrides) -> ml_collections.ConfigDict:
  """Tiny input section (helpers.input_config) at batch 8, 2 local crops, no TFDS data dir."""
  crops = dict(global_size=16, local_size=8, num_local=2)
  defaults = dict(batch_size=8, shuffle_buffer=64, data_dir='/nonexistent-tfds-dir')
  return helpers.input_config(crops, seed, **{**defaults, **overrides})


def _open(config, split):
  return sources.get(config.input).open(split)


@pytest.fixture(scope='module')
def npz_path(tmp_path_factory):
  """40 random 20x24 RGB images whose label is their index."""
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('npz') / 'tiny.npz')
  np.savez(path, images=rng.integers(0, 256, (40, 20, 24, 3), dtype=np.uint8), labels=np.arange(40))
  return path


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _range_of(config, channels):
  assert config.input.num_channels == channels
  spec = augment.color_spec(config.input)
  mean, std = np.array(spec.mean), np.array(spec.std)
  return ((0 - mean) / std).min(), ((1 - mean) / std).max()


def test_train_shapes_dtypes_ranges(npz_path):
  config = _config(dataset=f'npz:{npz_path}')
  batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
  assert set(batch) == {'global', 'local', 'label'}
  assert batch['global'].shape == (8, 2, 16, 16, 3) and batch['global'].dtype == np.float32
  assert batch['local'].shape == (8, 2, 8, 8, 3) and batch['local'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  low, high = _range_of(config, 3)
  for key in ('global', 'local'):
    assert batch[key].min() >= low - 1e-5 and batch[key].max() <= high + 1e-5
    assert batch[key].std() > 0.1
  assert np.all((batch['label'] >= 0) & (batch['label'] < 36))


def test_no_local_key_without_local_crops(npz_path):
  config = _config(dataset=f'npz:{npz_path}', crops=dict(num_local=0))
  batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
  assert set(batch) == {'global', 'label'}


def test_same_seed_same_batches_other_seed_differs(npz_path):
  config = _config(dataset=f'npz:{npz_path}')
  first = _take(data.make_train_iterator(config, process_index=0, process_count=1), 2)
  again = _take(data.make_train_iterator(config, process_index=0, process_count=1), 2)
  other = _take(
      data.make_train_iterator(
          _config(dataset=f'npz:{npz_path}', seed=1), process_index=0, process_count=1
      ),
      2,
  )
  for a, b, c in zip(first, again, other):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a['global'], c['global'])


def test_views_differ(npz_path):
  config = _config(dataset=f'npz:{npz_path}')
  batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
  g, l = batch['global'], batch['local']
  assert np.abs(g[:, 0] - g[:, 1]).mean() > 0.05
  for i in range(l.shape[1]):
    for j in range(i):
      assert np.abs(l[:, i] - l[:, j]).mean() > 0.05


def test_resume_matches_uninterrupted(npz_path):
  config = _config(dataset=f'npz:{npz_path}')
  uninterrupted = _take(data.make_train_iterator(config, process_index=0, process_count=1), 13)
  resumed = _take(
      data.make_train_iterator(config, start_step=7, process_index=0, process_count=1), 6
  )
  for a, b in zip(uninterrupted[7:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_epochs_cover_train_split_and_reshuffle(npz_path):
  config = _config(dataset=f'npz:{npz_path}', batch_size=12)  # 36 train examples.
  batches = _take(data.make_train_iterator(config, process_index=0, process_count=1), 6)
  epoch0 = np.concatenate([b['label'] for b in batches[:3]])
  epoch1 = np.concatenate([b['label'] for b in batches[3:]])
  assert sorted(epoch0) == list(range(36)) and sorted(epoch1) == list(range(36))
  assert not np.array_equal(epoch0, epoch1)


def test_two_processes_get_disjoint_covering_shards(npz_path):
  config = _config(dataset=f'npz:{npz_path}', batch_size=12)  # 6 per process.
  labels = []
  for process in range(2):
    it = data.make_train_iterator(config, process_index=process, process_count=2)
    labels.append(np.concatenate([b['label'] for b in _take(it, 3)]))
    assert all(len(l) == 18 for l in labels)
  assert not set(labels[0]) & set(labels[1])
  assert sorted(np.concatenate(labels)) == list(range(36))


def test_eval_visits_every_example_once_with_padding_masked(tmp_path):
  rng = np.random.default_rng(1)
  path = str(tmp_path / 'eval.npz')
  np.savez(
      path,
      images=rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8),
      labels=np.arange(5),
      test_images=rng.integers(0, 256, (13, 16, 16, 1), dtype=np.uint8),
      test_labels=np.arange(100, 113),
  )
  config = _config(dataset=f'npz:{path}', eval_batch_size=4, num_channels=1)
  seen, counts = [], []
  for process in range(2):
    batches = list(data.make_eval_iterator(config, 'test', process_index=process, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert b['image'].shape == (2, 16, 16, 1) and b['image'].dtype == np.float32
      assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
      assert np.all(b['image'][~b['mask']] == 0)
      seen.extend(b['label'][b['mask']])
  assert counts[0] == counts[1] == 4  # ceil(ceil(13 / 2) / 2).
  assert sorted(seen) == list(range(100, 113))


def test_eval_is_deterministic_center_crop(npz_path):
  config = _config(dataset=f'npz:{npz_path}', eval_crop_size=20, eval_batch_size=8)
  a = list(data.make_eval_iterator(config, 'train', process_index=0, process_count=1))
  b = list(data.make_eval_iterator(config, 'train', process_index=0, process_count=1))
  np.testing.assert_array_equal(a[0]['image'], b[0]['image'])
  # 20x24 image, crop 20 with no resize margin (< 64 px): the central 20x20.
  images = np.load(npz_path)['images']
  expected = (images[0, :, 2:22].astype(np.float32) / 255 - 0.5) / 0.5
  np.testing.assert_allclose(a[0]['image'][0], expected, atol=1e-5)


@pytest.mark.parametrize('channels', [3, 1])
def test_eval_batches_of_arrays_equal_the_per_example_path(npz_path, monkeypatch, channels):
  # Crop 16 of a 19-px shorter side: a real resize; 16 + 17 examples over 2 processes at
  # local batch 6 pad both last batches; 1 channel converts the stored RGB.
  config = _config(
      dataset=f'npz:{npz_path}',
      eval_crop_size=16,
      eval_resize_size=19,
      eval_batch_size=12,
      num_channels=channels,
  )

  def batches(process):
    return list(
        data.make_eval_iterator(
            config, 'train[:33]', process_index=process, process_count=2, with_ids=True
        )
    )

  batched = [batches(p) for p in range(2)]
  monkeypatch.setattr(sources.core.ArraySplit, 'batch_lookup', False)
  per_example = [batches(p) for p in range(2)]
  for ours, reference, num_real in zip(batched, per_example, (16, 17)):
    assert len(ours) == len(reference) == 3
    assert sum(b['mask'].sum() for b in ours) == num_real
    for a, b in zip(ours, reference):
      assert sorted(a) == sorted(b) == ['id', 'image', 'label', 'mask']
      for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('batch_lookup', [True, False])
def test_eval_pipelines_run_without_autotune(npz_path, monkeypatch, batch_lookup):
  # With autotune, the end of a finite pass stalled 10-14 s in half the demo's passes.
  seen = []
  original = tf.data.Dataset.as_numpy_iterator

  def recording(ds):
    seen.append(ds.options().autotune.enabled)
    return original(ds)

  monkeypatch.setattr(tf.data.Dataset, 'as_numpy_iterator', recording)
  monkeypatch.setattr(sources.core.ArraySplit, 'batch_lookup', batch_lookup)
  config = _config(dataset=f'npz:{npz_path}', eval_batch_size=8)
  batches = list(data.make_eval_iterator(config, 'train[:21]', process_index=0, process_count=1))
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 21
  assert seen == [False]
  next(data.make_train_iterator(config))
  assert seen[1] in (None, True)  # the endless training stream keeps tuning (None: TF's default)


@pytest.mark.skipif(not sources.idx.available(IDX_DIR), reason='no Fashion-MNIST IDX files')
def test_fashion_mnist_idx_fallback():
  config = _config(
      dataset='fashion_mnist',
      train_split='train[:1%]',
      num_channels=1,
      crops=dict(num_local=2, global_size=28, local_size=12),
  )
  source = sources.get(config.input)
  assert (source.kind, source.arg) == ('idx', IDX_DIR)
  info = data.get_dataset_info(config)
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1)
  assert info.num_examples == {'train': 60000, 'test': 10000}
  split = _open(config, 'train[:1%]')
  assert split.num_examples == 600 and split.images.dtype == np.uint8
  batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
  assert batch['global'].shape == (8, 2, 28, 28, 1)
  assert batch['local'].shape == (8, 2, 12, 12, 1)
  low, high = _range_of(config, 1)
  assert batch['global'].min() >= low - 1e-5 and batch['global'].max() <= high + 1e-5
  ev = list(data.make_eval_iterator(config, 'test[:10]', process_index=0, process_count=1))
  assert len(ev) == 3 and sum(b['mask'].sum() for b in ev) == 10
  raw = _open(config, 'test[:10]')
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in ev])[:10], raw.labels)


def test_bad_inputs_raise_clear_errors(npz_path, tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'foo:bar'.*npz:"):
    _open(_config(dataset='foo:bar'), 'train')
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'.*imagefolder:"):
    data.get_dataset_info(_config(dataset='no_such_dataset_xyz'))
  with pytest.raises(ValueError, match='no split .valid.*available splits'):
    _open(_config(dataset=f'npz:{npz_path}'), 'valid')
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    data.make_train_iterator(
        _config(dataset=f'npz:{npz_path}', batch_size=8), process_index=0, process_count=3
    )
  with pytest.raises(FileNotFoundError, match='does not exist'):
    _open(_config(dataset=f'npz:{tmp_path}/missing.npz'), 'train')
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, images=np.zeros((4, 8, 8), np.float32), labels=np.arange(4))
  with pytest.raises(ValueError, match='uint8'):
    _open(_config(dataset=f'npz:{bad}'), 'train')
  with pytest.raises(ValueError, match="'images'"):
    np.savez(bad, pixels=np.zeros((4, 8, 8), np.uint8))
    _open(_config(dataset=f'npz:{bad}'), 'train')
  np.savez(bad, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4), test_images=[[[0]]])
  with pytest.raises(ValueError, match="has 'test_images' but no 'test_labels'"):
    _open(_config(dataset=f'npz:{bad}'), 'test')  # was KeyError: 'test_labels'
  with pytest.raises(ValueError, match='cannot parse split'):
    _open(_config(dataset=f'npz:{npz_path}'), 'train[::2]')


def test_prefetch_to_mesh_shards_batch_axis(npz_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  config = _config(dataset=f'npz:{npz_path}', batch_size=16)
  local = _take(data.make_train_iterator(config, process_index=0, process_count=1), 3)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  it = prefetch.prefetch_to_mesh(iter(local), sharding, size=2)
  arrays = list(it)
  assert len(arrays) == 3
  for host, device in zip(local, arrays):
    for key in host:
      assert isinstance(device[key], jax.Array)
      assert device[key].shape == host[key].shape
      assert device[key].sharding.is_equivalent_to(
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')), host[key].ndim
      )
      assert len(device[key].addressable_shards) == 8
      assert device[key].addressable_shards[1].data.shape[0] == 2
      np.testing.assert_array_equal(np.asarray(device[key]), host[key])
  # (mesh, spec) form with a spec longer than the label rank.
  pair = list(
      prefetch.prefetch_to_mesh(
          iter(local[:1]), (mesh, jax.sharding.PartitionSpec('data', None)), size=1
      )
  )
  assert pair[0]['label'].shape == (16,)
  with pytest.raises(TypeError, match='Sharding'):
    next(prefetch.prefetch_to_mesh(iter(local), 'data'))


def test_prefetch_raises_a_source_error_after_the_batches_before_it():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))

  def source():
    for i in range(3):
      yield {'x': np.full((8, 2), i, np.float32)}
    raise OSError('corrupt record')

  it = prefetch.prefetch_to_mesh(source(), (mesh, jax.sharding.PartitionSpec('data')), size=2)
  # Every batch read before the failure is delivered (the error came 2 batches early).
  assert [int(np.asarray(next(it)['x'])[0, 0]) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(OSError, match='corrupt record'):
    next(it)


def test_idx_directory_without_idx_files_names_the_fix(tmp_path):
  config = _config(dataset=f'idx:{tmp_path}')
  assert 'train-images-idx3-ubyte and train-labels-idx1-ubyte' in sources.check(config.input)
  for read in (data.get_dataset_info, lambda c: _open(c, 'train')):  # was max() of nothing
    with pytest.raises(FileNotFoundError, match="not found in .*config.input.dataset='idx:"):
      read(config)


def test_source_paths_may_start_with_a_tilde(npz_path, tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'data').mkdir()
  np.savez(tmp_path / 'data' / 'tiny.npz', **np.load(npz_path))
  config = _config(dataset='npz:~/data/tiny.npz')  # as --config.input.dataset=npz:~/... passes it
  assert sources.check(config.input) is None  # was: file ~/data/tiny.npz does not exist
  assert _open(config, 'train').num_examples == 36
