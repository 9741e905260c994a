"""What keeps a run safe: stop requests from signals (agreed by all processes), the workdir
lock, the non-finite-update policy, and the exit codes that name how a run ended.

A preemption notice (SIGTERM) or Ctrl-C (SIGINT) asks the run to stop: the loop finishes the
step in flight, saves a checkpoint at that step, waits for it, flushes the metric writers and
raises `Preempted`; `bits_jax.main` exits with `EXIT_PREEMPTED` so a scheduler can requeue the
same command, which resumes there. A second signal of the same kind gives up on the graceful
stop (the signal's default action).

Several processes must save at the same step:
  * with `jax.distributed` and JAX's preemption service (the default), SIGTERM is JAX's own:
    its notifier tells the coordinator, which picks the step at which every process stops;
    `StopRequest.should_stop(step)` is `multihost_utils.reached_preemption_sync_point(step)`
    and SIGINT is turned into a SIGTERM so that it takes the same path;
  * otherwise every process all-gathers its stop flag after every step (one tiny collective)
    and all stop when any has one.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import signal
import socket
import threading

from absl import logging
from etils import epath
import jax
import numpy as np

from bits_jax import utils

# sysexits.h codes, so schedulers and scripts can tell the cases apart.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved; rerun the same command to resume
EXIT_NONFINITE = 65  # EX_DATAERR: stopped on non-finite loss/gradients; last checkpoint intact
EXIT_WORKDIR = 73  # EX_CANTCREAT: workdir locked, read-only or full
EXIT_CONFIG = 78  # EX_CONFIG: invalid config, or a config change refused on resume

LOCK_FILE = ".bits_jax.lock"
# flock errors of file systems that have no flock (NFS without lockd, Lustre -o noflock).
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
    super().__init__(
        f"Stopped by {signal_name} after step {step}; checkpoint {step} saved in "
        f"{checkpoint_dir}. Rerun the same command to resume."
    )
    self.step = step
    self.signal_name = signal_name


class WorkdirError(RuntimeError):
  """The workdir cannot be used: locked by another run, read-only, full."""


def _sync_manager():
  """JAX's preemption sync manager when jax.distributed runs it, else None."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  state = distributed.global_state
  if state.client is None:
    return None
  return state.preemption_sync_manager


class StopRequest:
  """Context manager: signal handlers on enter, restored on exit; `should_stop(step)`."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous = {}
    self.signal_name: str | None = None
    self._jax_service = False

  # The handlers only set a flag: the loop acts on it between steps.
  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name == name:
      logging.warning("Second %s: giving up on the graceful stop.", name)
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.signal_name = name
    logging.warning("%s received: finishing the current step, then saving a checkpoint.", name)
    if jax.process_index() == 0:
      print(f"{name} received: finishing the current step, then saving a checkpoint.", flush=True)

  def _forward_to_jax(self, signum, frame):
    """SIGINT under JAX's preemption service: becomes a SIGTERM for JAX's notifier."""
    del frame
    if self.signal_name is not None:
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.signal_name = signal.Signals(signum).name
    logging.warning(
        "%s received: forwarded to JAX's preemption service as SIGTERM.", self.signal_name
    )
    signal.raise_signal(signal.SIGTERM)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not in the main thread: no signal handlers; stop requests ignored.")
      return self
    self._jax_service = jax.process_count() > 1 and _sync_manager() is not None
    for sig in self._signals:
      if self._jax_service and sig == signal.SIGTERM:
        continue  # JAX's notifier owns SIGTERM.
      handler = self._forward_to_jax if self._jax_service else self._handle
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  @property
  def requested(self) -> bool:
    """Whether this process received a stop signal."""
    return self.signal_name is not None

  def should_stop(self, step: int) -> bool:
    """Whether every process stops after `step`; call after every step, on every process."""
    if jax.process_count() == 1:
      return self.requested
    if self._jax_service:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    if np.any(flags):
      self.signal_name = self.signal_name or "a stop signal on another process"
      return True
    return False


# ---------------------------------------------------------------------------- workdir


def workdir_path(workdir: epath.PathLike) -> epath.Path:
  """`workdir` as an absolute epath: local paths made absolute, `gs://...` URLs kept."""
  path = epath.Path(workdir)
  return path if path.is_absolute() else path.absolute()


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on a local (POSIX) file system rather than an object store (gs://...)."""
  return "://" not in os.fspath(path)


def _describe(e: OSError) -> str:
  if e.errno == errno.EROFS:
    return "the file system is read-only"
  if e.errno == errno.ENOSPC:
    return "the disk is full (No space left on device)"
  if e.errno in (errno.EACCES, errno.EPERM):
    return "permission denied"
  return f"{type(e).__name__}: {e}"


def check_writable(workdir: epath.PathLike) -> None:
  """Creates `workdir` and writes, syncs and removes a probe file; WorkdirError if it fails."""
  workdir = workdir_path(workdir)
  probe = workdir / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if is_local(workdir):
      with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    else:
      probe.write_bytes(b"\0" * 4096)
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # object stores raise their own errors
    problem = _describe(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    raise WorkdirError(
        f"Workdir {workdir} is not writable: {problem}. Checkpoints already there are "
        "untouched. Fix the disk (free space, remount read-write) or the bucket's "
        "permissions, or pass another --workdir."
    ) from e


def _holder_text() -> str:
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return f"pid {os.getpid()} on {socket.gethostname()}, started {now}\n"


class WorkdirLock:
  """Exclusive lock on `workdir` (WORKDIR/.bits_jax.lock) for the life of a run.

  A second run on the same workdir fails at once with the holder's pid, host and start
  time. On several processes only process 0 locks (they share the workdir).

  Local file systems: flock. The kernel drops the lock when the process dies, even by
  SIGKILL, so a crashed run leaves no stale lock. flock on network file systems may be
  per-host only.

  Object stores (gs://...), and shared file systems that refuse flock (NFS without a lock
  daemon: ENOLCK; Lustre mounted without flock: ENOSYS), have no lock the run can rely on,
  so the lock is best effort (a warning says so): a lock object holding the holder and a
  heartbeat time that a thread refreshes every `HEARTBEAT_S` seconds. A lock object whose
  heartbeat is older than `STALE_S` (a crashed or preempted run) is taken over with a
  warning; two runs starting within the same few seconds may both proceed (after writing,
  the lock is read back and the run whose text is not there stops). The object is deleted
  when the run ends.
  """

  HEARTBEAT_S = 60.0
  STALE_S = 300.0

  def __init__(self, workdir: epath.PathLike):
    self.workdir = workdir_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None
    self._text: str | None = None
    self._stop: threading.Event | None = None
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    if not is_local(self.workdir):
      self._lock_object("is on an object store (no atomic exclusive create)")
    elif not self._flock():
      self._lock_object("is on a file system without flock")
    return self

  def _flock(self) -> bool:
    """Takes the flock; False where the file system has none (`_NO_FLOCK`)."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise self._in_use(holder) from e
      if e.errno in _NO_FLOCK:
        return False
      raise WorkdirError(f"Cannot lock {self.path}: {_describe(e)}.") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)
    self._fd = fd
    return True

  def _in_use(self, holder: str) -> WorkdirError:
    return WorkdirError(
        f"Workdir {self.workdir} is in use by another run ({holder}). Wait for it to finish "
        "or stop it, or pass another --workdir."
    )

  def _read_object(self) -> tuple[str, float] | None:
    """(holder text, seconds since its heartbeat) of the lock object, None if there is none
    (or it is empty: the file a refused flock created)."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    if not text.strip():
      return None
    beat = text.rsplit("heartbeat ", 1)[-1].strip() if "heartbeat " in text else ""
    try:
      age = (
          datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(beat)
      ).total_seconds()
    except ValueError:
      age = float("inf")  # not our format: treated as stale
    return text.split("; heartbeat", 1)[0].strip(), age

  def _write_object(self) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self.path.write_text(f"{self._text.strip()}; heartbeat {now}\n")

  def _lock_object(self, why: str) -> None:
    message = (
        f"Workdir {self.workdir} {why}: the workdir lock is best effort (a lock file with a "
        "heartbeat); do not start two runs on it at once."
    )
    if is_local(self.workdir):  # a surprise there, unlike on a bucket: say it on the console
      utils.announce(message)
    else:
      logging.warning("%s", message)
    existing = self._read_object()
    if existing is not None:
      holder, age = existing
      if age < self.STALE_S:
        raise self._in_use(
            f"{holder}; last heartbeat {age:.0f}s ago. If that run is dead, its lock is taken "
            f"over {self.STALE_S - age:.0f}s from now: rerun then"
        )
      message = (
          f"Taking over the lock of {self.workdir} from {holder}: no heartbeat for "
          f"{age:.0f}s (a run that crashed or was preempted)."
      )
      utils.announce(message)
    self._text = _holder_text()
    self._write_object()
    existing = self._read_object()
    if existing is None or existing[0] != self._text.strip():
      raise self._in_use(existing[0] if existing else "unknown; the lock object vanished")
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.HEARTBEAT_S):
      try:
        self._write_object()
      except Exception as e:  # pylint: disable=broad-except  # a missed beat is not fatal
        logging.warning("Could not refresh the workdir lock %s: %s", self.path, e)

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      existing = self._read_object()
      if existing is not None and existing[0] == self._text.strip():
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------- non-finite


class NonFiniteError(RuntimeError):
  """The run stopped on non-finite loss/gradients (`config.on_nonfinite`)."""


class NonFiniteGuard:
  """Counts updates the train step skipped for a non-finite loss or gradients.

  `observe(step, skipped)` returns why the run must stop, or None: at the first skipped
  update under `on_nonfinite='stop'`, after `max_consecutive_nonfinite` in a row under 'skip'.
  """

  def __init__(self, config):
    self.policy = config.on_nonfinite
    self.max_consecutive = int(config.max_consecutive_nonfinite)
    self.consecutive = 0
    self.total = 0

  def observe(self, step: int, skipped: bool) -> str | None:
    if not skipped:
      self.consecutive = 0
      return None
    self.consecutive += 1
    self.total += 1
    if jax.process_index() == 0:
      print(
          f"step {step}: non-finite loss or gradients, update skipped "
          f"({self.consecutive} in a row, {self.total} in this run)",
          flush=True,
      )
    if self.policy == "stop":
      return (
          f"Stopping at step {step}: the loss or gradients are not finite "
          "(config.on_nonfinite='stop')."
      )
    if self.consecutive >= self.max_consecutive:
      return (
          f"Stopping at step {step}: {self.consecutive} consecutive updates had a "
          "non-finite loss or gradients and were skipped "
          f"(config.max_consecutive_nonfinite={self.max_consecutive})."
      )
    return None
