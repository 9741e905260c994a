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
import jax
import numpy as np

# sysexits.h codes, so schedulers and scripts can tell the cases apart.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved; rerun the same command to resume
EXIT_NONFINITE = 65  # EX_DATAERR: stopped on non-finite loss/gradients; last checkpoint intact
EXIT_WORKDIR = 73  # EX_CANTCREAT: workdir locked, read-only or full
EXIT_CONFIG = 78  # EX_CONFIG: invalid config, or a config change refused on resume

LOCK_FILE = ".bits_jax.lock"


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


def _describe(e: OSError) -> str:
  if e.errno == errno.EROFS:
    return "the file system is read-only"
  if e.errno == errno.ENOSPC:
    return "the disk is full (No space left on device)"
  if e.errno in (errno.EACCES, errno.EPERM):
    return "permission denied"
  return f"{type(e).__name__}: {e}"


def check_writable(workdir: str) -> None:
  """Creates `workdir` and writes, syncs and removes a probe file; WorkdirError if it fails."""
  probe = os.path.join(workdir, f".write_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f"Workdir {workdir} is not writable: {_describe(e)}. Checkpoints already there are "
        "untouched. Fix the disk (free space, remount read-write) or pass another "
        "--workdir."
    ) from e


class WorkdirLock:
  """Exclusive lock on `workdir` (flock on WORKDIR/.bits_jax.lock) for the life of a run.

  A second run on the same workdir fails at once with the holder's pid, host and start
  time. The kernel drops the lock when the process dies, even by SIGKILL, so a crashed run
  leaves no stale lock. On several processes only process 0 locks (they share the workdir).
  flock on network file systems may be per-host only.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f"Workdir {os.path.dirname(self.path)} is in use by another run ({holder}). Wait "
            "for it to finish or stop it, or pass another --workdir."
        ) from e
      raise WorkdirError(f"Cannot lock {self.path}: {_describe(e)}.") from e
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


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
