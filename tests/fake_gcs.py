"""A fake `gs://` object store for tests: `gs://BUCKET/key` lives in `ROOT/BUCKET/key`.

`fake_gcs(root)` patches, for the duration of the context:
  * etils.epath: `gs://` paths get an os backend that maps them under `root` (TensorFlow's
    gfile would otherwise go to the real GCS);
  * Orbax/TensorStore: the `gcs` kvstore spec becomes a `file` kvstore under `root`, and the
    bucket reports no hierarchical namespace (no GCS client is created);
  * CLU's TensorBoard writer: a `gs://` logdir is mapped under `root` (TensorFlow's own GCS
    file system cannot be redirected from Python).
Everything else Orbax does for GCS (no atomic rename: `commit_success.txt` marks a finished
step) runs as on a real bucket. No network, no credentials; nothing is written to `./gs:`.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

from etils.epath import backend as epath_backend
from etils.epath import gpath

PREFIX = "gs://"


class _FakeGcsBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """os backend on `root`; paths are `gs://...` strings in and out."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    if not path.startswith(PREFIX):
      return path
    return os.path.join(self.root, path[len(PREFIX) :])

  def remote(self, path) -> str:
    rel = os.path.relpath(os.fspath(path), self.root)
    return PREFIX + rel if not rel.startswith("..") else os.fspath(path)

  def open(self, path, mode):
    if any(m in mode for m in "wa"):
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)  # objects need no dirs
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.remote(p) for p in super().glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
      yield self.remote(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def rename(self, path, dst):
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


@contextlib.contextmanager
def fake_gcs(root: str):
  """Context: `gs://` paths (epath, Orbax, TensorStore, CLU writers) live under `root`."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  fake = _FakeGcsBackend(root)
  backends = dict(gpath._PREFIX_TO_BACKEND, gs=fake)  # pylint: disable=protected-access

  def kvstore(path: str) -> dict:
    return {"driver": "file", "path": fake.local(path)}

  real_writer = metric_writers.create_default_writer

  def writer(logdir, **kwargs):
    return real_writer(fake.local(logdir) if logdir else logdir, **kwargs)

  with contextlib.ExitStack() as stack:
    patch = lambda *a, **k: stack.enter_context(mock.patch.object(*a, **k))
    patch(gpath, "_PREFIX_TO_BACKEND", backends)
    patch(gpath, "_GCS_BACKENDS", frozenset(gpath._GCS_BACKENDS | {fake}))  # pylint: disable=protected-access
    patch(gpath, "_is_tf_installed", lambda: False)
    patch(gcs_utils, "get_kvstore_for_gcs", kvstore)
    patch(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    patch(metric_writers, "create_default_writer", writer)
    yield fake
