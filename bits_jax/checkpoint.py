"""Orbax checkpoints of the train state that a crash, a kill or a bad disk cannot spoil.

Layout: `WORKDIR/checkpoints/<step>/` (Orbax), each with `bits_manifest.json` (size and
SHA-256 of every file), and `WORKDIR/corrupt_checkpoints/` for checkpoints found damaged.

Guarantees (tested in tests/test_faults.py):
  * Commit: Orbax writes a step to `<step>.orbax-checkpoint-tmp-<t>/` and renames it to
    `<step>/` when complete, so a kill during a save leaves at most a tmp dir, which is
    reported and removed at the next start; the step is never listed.
  * Content: after the commit, `bits_manifest.json` records every file's size and SHA-256.
    At restore a checkpoint whose files differ from its manifest (truncated, overwritten,
    missing), or whose values are not finite, or that has no manifest and Orbax cannot read,
    is moved to `corrupt_checkpoints/` and the next older one is tried; the run says so. A
    committed step without a manifest (a kill between commit and manifest) is accepted only
    if it restores and validates, and then gets its manifest. A step whose files match its
    manifest but that Orbax cannot restore (out of device memory, another Orbax version, a
    read error) is not damaged: `CheckpointRestoreError`, nothing moved.
  * Retention: Orbax's own garbage collection is off; old steps are deleted only after a
    newer step is committed and its manifest written, so a good checkpoint is never
    deleted before the next one is complete.
  * Disk: a save is refused up front when the free space is below the previous
    checkpoint's size; a failing write (full or read-only disk) raises
    `CheckpointWriteError` naming the intact steps.

Any `etils.epath` workdir works (local, `gs://...`); all paths here are epath paths. On an
object store (tested with a fake `gs://`, tests/test_gcs_workdir.py) Orbax commits a step by
writing `commit_success.txt` last instead of renaming a tmp dir, so an incomplete save is a
step directory without that file (removed at the next start like a tmp dir); the manifest
is written as one object (object writes are atomic, no tmp + rename); hashing reads every
object back through epath (one download of the checkpoint per save and per verified
restore); a quarantined step is copied object by object, then deleted (object stores
cannot rename); and there is no free-space check (buckets have no fixed size).
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from bits_jax import run_guard
from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import utils
from bits_jax.train_state import TrainState

MANIFEST = "bits_manifest.json"
QUARANTINE = "corrupt_checkpoints"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"  # Orbax's commit marker on object stores


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (full or read-only disk, I/O error)."""


class CheckpointMismatchError(RuntimeError):
  """An intact checkpoint does not fit the train state of the current config."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint whose files match its manifest cannot be restored (not damage)."""


def checkpoint_manager(workdir: epath.PathLike, config) -> ocp.CheckpointManager:
  """Async Orbax manager of `WORKDIR/checkpoints`; retention is done by `Checkpoints`."""
  del config
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(
      run_guard.workdir_path(workdir) / "checkpoints",
      item_handlers=ocp.StandardCheckpointHandler(),
      options=options,
  )


# -------------------------------------------------------------------------- manifests


def _file_digest(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _list_files(step_dir: epath.PathLike) -> list[str]:
  """Relative paths ('a/b') of the files of a step directory, without the manifest."""
  files = []

  def visit(directory: epath.Path, prefix: str) -> None:
    for child in directory.iterdir():
      rel = f"{prefix}{child.name}"
      if child.is_dir():
        visit(child, rel + "/")
      elif rel != MANIFEST:
        files.append(rel)

  visit(epath.Path(step_dir), "")
  return sorted(files)


def write_text_atomically(path: epath.Path, text: str) -> None:
  """Readers see the old or the new text, never a part: tmp + fsync + rename on a local
  disk; object stores make a single object write atomic themselves."""
  if not run_guard.is_local(path):
    path.write_text(text)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_manifest(step_dir: epath.PathLike, step: int) -> dict:
  """Records size and SHA-256 of every file of a committed step; returns the manifest."""
  step_dir = epath.Path(step_dir)
  files = {
      rel: {"size": (step_dir / rel).stat().length, "sha256": _file_digest(step_dir / rel)}
      for rel in _list_files(step_dir)
  }
  manifest = {
      "step": int(step),
      "files": files,
      "total_bytes": int(sum(f["size"] for f in files.values())),
      "written": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  write_text_atomically(step_dir / MANIFEST, json.dumps(manifest, indent=1))
  return manifest


def read_manifest(step_dir: epath.PathLike) -> dict | None:
  path = epath.Path(step_dir) / MANIFEST
  if not path.exists():
    return None
  return json.loads(path.read_text())


def manifest_problem(step_dir: str) -> str | None:
  """Why the files of `step_dir` differ from its manifest; None if they match.

  Raises FileNotFoundError if there is no manifest.
  """
  try:
    manifest = read_manifest(step_dir)
  except (OSError, ValueError) as e:
    return f"unreadable manifest ({e})"
  if manifest is None:
    raise FileNotFoundError(os.fspath(epath.Path(step_dir) / MANIFEST))
  expected = manifest.get("files", {})
  present = set(_list_files(step_dir))
  missing = sorted(set(expected) - present)
  if missing:
    return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
  extra = sorted(present - set(expected))
  if extra:
    return f"{len(extra)} unexpected file(s), e.g. {extra[0]}"
  for rel, want in sorted(expected.items()):
    path = epath.Path(step_dir) / rel
    size = path.stat().length
    if size != want["size"]:
      return f"{rel} has {size} bytes, the manifest says {want['size']} (truncated?)"
    if _file_digest(path) != want["sha256"]:
      return f"{rel} does not match its SHA-256 in the manifest (overwritten or bit rot)"
  return None


# --------------------------------------------------------------------------- restore


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(manager.directory) / str(step)


def _leaf_specs(tree) -> list[tuple[tuple[int, ...], str]]:
  """Sorted (shape, dtype) of every array leaf: a structure fingerprint for Orbax metadata."""
  leaves = jax.tree_util.tree_leaves(tree)
  return sorted(
      (tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)))
      for x in leaves
      if hasattr(x, "shape") and hasattr(x, "dtype")
  )


def _incompatibility(manager: ocp.CheckpointManager, step: int, target) -> str | None:
  """Why an intact checkpoint cannot hold the `target` state, from its Orbax metadata."""
  try:
    metadata = manager.item_metadata(step)
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: judged at restore
    return None
  tree = getattr(metadata, "tree", metadata)
  if tree is None:
    return None
  saved, wanted = _leaf_specs(tree), _leaf_specs(target)
  if not saved or saved == wanted:
    return None
  only_saved = sorted(set(saved) - set(wanted))[:3]
  only_wanted = sorted(set(wanted) - set(saved))[:3]
  return (
      f"it holds {len(saved)} arrays, the current config's train state has "
      f"{len(wanted)}; (shape, dtype) only in the checkpoint: {only_saved}, only in the "
      f"config: {only_wanted}"
  )


def _restored_problem(state: TrainState, step: int) -> str | None:
  if int(state.step) != step:
    return f"it holds step {int(state.step)} under the name {step}"
  if not bool(jax.jit(utils.tree_all_finite)(state)):
    return "it holds non-finite values"
  return None


def _incomplete_writes(directory: epath.Path) -> list[str]:
  """Names of saves that never committed: Orbax tmp dirs, and on object stores step
  directories without Orbax's commit file."""
  names = []
  for child in directory.iterdir():
    if _TMP_MARKER in child.name:
      names.append(child.name)
    elif (
        not run_guard.is_local(directory)
        and child.name.isdigit()
        and not (child / _COMMIT_FILE).exists()
    ):
      names.append(child.name)
  return sorted(names)


def remove_incomplete_writes(directory: epath.PathLike) -> list[str]:
  """Deletes the writes of saves that never committed; returns their names."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  names = _incomplete_writes(directory)
  if jax.process_index() == 0:
    for name in names:
      utils.announce(
          f"Found an incomplete checkpoint write {directory / name} (the run stopped while "
          "saving): it was never a complete checkpoint; removing it."
      )
      (directory / name).rmtree(missing_ok=True)
  utils.sync_processes("bits_jax_remove_incomplete_writes")
  return names


def _move_tree(source: epath.Path, dest: epath.Path) -> None:
  """Renames a directory; on object stores (no rename) copies it object by object first."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  if run_guard.is_local(source) and run_guard.is_local(dest):
    shutil.move(os.fspath(source), os.fspath(dest))
    return
  for rel in _list_files(source) + ([MANIFEST] if (source / MANIFEST).exists() else []):
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    (source / rel).copy(dest / rel)
  source.rmtree()


def quarantine(manager: ocp.CheckpointManager, step: int, problem: str) -> epath.Path:
  """Moves a damaged step to `WORKDIR/corrupt_checkpoints/` (never deletes it); returns where."""
  source = _step_dir(manager, step)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  dest = epath.Path(manager.directory).parent / QUARANTINE / f"{step}-{stamp}"
  utils.sync_processes(f"bits_jax_quarantine_{step}")
  if jax.process_index() == 0:
    _move_tree(source, dest)
    utils.announce(
        f"Checkpoint step {step} in {manager.directory} is damaged: {problem}. Moved it to "
        f"{dest}; falling back to the previous checkpoint."
    )
  utils.sync_processes(f"bits_jax_quarantined_{step}")
  manager.reload()
  return dest


def _restore_error(manager: ocp.CheckpointManager, step: int, error: str):
  return CheckpointRestoreError(
      f"Checkpoint step {step} in {manager.directory} matches its manifest (its files are as "
      f"written) but cannot be restored: {error}. It was not moved. Fix the cause (out of "
      "device memory: a larger config.mesh.fsdp, or free the accelerator; the JAX / Orbax "
      "versions it was written with) and rerun the same command; to give up on this step, "
      f"move {_step_dir(manager, step)} out of {manager.directory} and rerun to resume from "
      "the previous one."
  )


def restore_latest_good(manager: ocp.CheckpointManager, target) -> TrainState | None:
  """The newest checkpoint that is intact and valid, damaged newer ones quarantined.

  Returns None when no intact checkpoint is left. Raises `CheckpointMismatchError` for an
  intact checkpoint that does not fit `target` (a config change, not damage), and
  `CheckpointRestoreError` for one that matches its manifest but does not restore.
  """
  remove_incomplete_writes(manager.directory)
  manager.reload()
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = _step_dir(manager, step)
    try:
      problem, verified = manifest_problem(step_dir), True
    except FileNotFoundError:
      problem, verified = None, False
    if problem is None:
      mismatch = _incompatibility(manager, step, target)
      if mismatch:
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {manager.directory} does not fit the train state of "
            f"the current config: {mismatch}. Resume with the config it was written with "
            "(workdir/config.json), or use a new --workdir."
        )
      try:
        state = manager.restore(step, args=ocp.args.StandardRestore(target))
        problem = _restored_problem(state, step)
      except Exception as e:  # pylint: disable=broad-except  # judged below
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        error = f"{type(e).__name__}: {first_line}"
        if verified:  # the files are as written: the cause is here, not in the checkpoint
          raise _restore_error(manager, step, error) from e
        problem = f"Orbax cannot restore it ({error})"
    if problem is None:
      if not verified:
        if jax.process_index() == 0:
          write_manifest(step_dir, step)
        utils.announce(
            f"Checkpoint step {step} had no manifest (the run stopped between commit and "
            "manifest); it restored and validated, manifest written."
        )
      if damaged:
        utils.announce(
            f"Resuming from checkpoint step {step} in {manager.directory}, the newest intact "
            f"one (damaged: {damaged}, moved to {QUARANTINE}/)."
        )
      else:
        utils.announce(f"Resuming from checkpoint step {step} in {manager.directory}", warn=False)
      return state
    quarantine(manager, step, problem)
    damaged.append(step)
  if damaged:
    utils.announce(
        f"No intact checkpoint left in {manager.directory} (damaged: {damaged}, moved to "
        f"{QUARANTINE}/): starting from step 0."
    )
  return None


def initial_or_restored_state(components, config, mesh, manager) -> TrainState:
  """The newest intact checkpoint if any (see `restore_latest_good`), else a fresh state."""
  target = sharding_lib.abstract_state(components, config, mesh)
  restored = restore_latest_good(manager, target)
  if restored is not None:
    return restored
  init = jax.jit(
      lambda: train_state_lib.create(components, config, jax.random.PRNGKey(config.seed)),
      out_shardings=sharding_lib.shardings_of(target),
  )
  return init()


# ------------------------------------------------------------------------------ save


def _state_bytes(state) -> int:
  return int(
      sum(
          x.size * np.dtype(x.dtype).itemsize
          for x in jax.tree_util.tree_leaves(state)
          if hasattr(x, "dtype")
      )
  )


def _os_error_in(e: BaseException) -> OSError | None:
  """The OSError in an exception's chain (Orbax and TensorStore wrap them), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _describe_os_error(e: BaseException) -> str:
  code = getattr(e, "errno", None)
  if code == errno.ENOSPC:
    detail = e.strerror if e.strerror != os.strerror(code) else "No space left on device"
    return f"the disk is full ({detail})"
  if code == errno.EROFS:
    return "the file system is read-only"
  if code in (errno.EACCES, errno.EPERM):
    return "permission denied"
  text = f"{type(e).__name__}: {e}"
  if "No space left on device" in text or "os_error_code='28'" in text:
    return f"the disk is full ({text[:400]})"
  if "Read-only file system" in text or "os_error_code='30'" in text:
    return f"the file system is read-only ({text[:400]})"
  return text


class Checkpoints:
  """Saves (async) and restores the train state of one workdir with the guarantees above.

  `save(step, state)` returns once Orbax has the arrays; the write, commit, manifest and
  retention of that step happen at the next `save` or at `finalize()`, which waits.
  """

  def __init__(self, workdir: epath.PathLike, config):
    self.workdir = run_guard.workdir_path(workdir)
    self.manager = checkpoint_manager(self.workdir, config)
    self.directory = epath.Path(self.manager.directory)
    self.keep = int(config.keep_checkpoints)
    self._pending: int | None = None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_or_init(self, components, config, mesh) -> TrainState:
    return initial_or_restored_state(components, config, mesh, self.manager)

  def _write_error(self, step: int, e: BaseException) -> CheckpointWriteError:
    intact = [s for s in self.steps() if s != step]
    return CheckpointWriteError(
        f"Cannot write checkpoint step {step} to {self.directory}: "
        f"{_describe_os_error(e)}. Intact checkpoints: {intact or 'none'}. Free space (or "
        "fix the disk) and rerun the same command to resume from step "
        f"{max(intact) if intact else 0}."
    )

  def _check_free_space(self, step: int, state) -> None:
    """Refuses a save that cannot fit: the previous checkpoint's size, else the raw state."""
    if not run_guard.is_local(self.directory):
      return  # buckets have no fixed size; a failing write still raises CheckpointWriteError
    previous = [read_manifest(self.directory / str(s)) for s in self.steps()[-1:]]
    needed = previous[0]["total_bytes"] if previous and previous[0] else _state_bytes(state)
    needed = int(needed * 1.1) + (64 << 10)
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise self._write_error(
          step, OSError(errno.ENOSPC, f"{free} bytes free, a checkpoint needs about {needed}")
      )

  def save(self, step: int, state: TrainState) -> None:
    """Starts an async save of `state` as `step` (finalizing the previous save first)."""
    self.finalize()
    if step in self.steps():
      return
    self._check_free_space(step, state)
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore I/O errors
      raise self._write_error(step, _os_error_in(e) or e) from e
    self._pending = step

  def finalize(self) -> None:
    """Waits for the pending save; writes its manifest; deletes steps beyond `keep`."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore I/O errors
      raise self._write_error(step, _os_error_in(e) or e) from e
    step_dir = self.directory / str(step)
    if not step_dir.is_dir():
      raise self._write_error(step, RuntimeError("the save did not commit"))
    try:
      if jax.process_index() == 0:
        write_manifest(step_dir, step)
    except OSError as e:
      raise self._write_error(step, e) from e
    utils.sync_processes(f"bits_jax_manifest_{step}")
    self.manager.reload()
    for old in self.steps()[: -self.keep]:
      if old < step:
        self.manager.delete(old)

  def close(self) -> None:
    """Finalizes the pending save and releases Orbax's threads."""
    self.finalize()
    self.manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Releases Orbax's threads (a run in a notebook kept them); a save still in flight
    is waited for but, after an error, not given a manifest (resume validates it)."""
    if exc_type is None:
      self.close()
      return
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except  # the error in flight matters more
      logging.exception("Closing the checkpoint manager of %s failed", self.directory)
