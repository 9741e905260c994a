"""Fault injection on CPU: signals, kills, damaged checkpoints, NaN batches, disk, lock.

End-to-end faults run `python -m bits_jax.main` (through tests/fault_driver.py, which only adds
hooks) in subprocesses on 2 fake CPU devices, sharing a persistent compilation cache, and
compare whole train states (params, teacher, optimizer, rng, step, counters) with
`np.testing.assert_array_equal`: resumption must be bit-exact, not close.
"""

import collections
import errno
import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bits_jax import checkpoint as checkpoint_lib
from bits_jax import config_validation
from bits_jax import run_guard
from bits_jax import sharding as sharding_lib
from bits_jax import train
from bits_jax import train_state
from tests import helpers

TOTAL_STEPS = 6  # of the fashion_mnist:test preset
_BASE_ARGS = (
    "--config=configs/fashion_mnist.py:test",
    "--config.evals.knn.at_end=False",
    "--config.evals.retrieval.at_end=False",
    "--verbosity=-1",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: 2 fake CPU devices, a compilation cache shared by the runs."""
  cache = tmp_path_factory.mktemp("jax_cache")
  environ = dict(os.environ)
  for hook in ("BITS_TEST_STEP_DELAY", "BITS_TEST_NAN_AT_STEPS", "BITS_TEST_KILL_AT_COMMIT"):
    environ.pop(hook, None)
  environ.update({
      "XLA_FLAGS": helpers.xla_flags(2),
      "JAX_PLATFORMS": "cpu",
      "TF_CPP_MIN_LOG_LEVEL": "3",
      "JAX_COMPILATION_CACHE_DIR": str(cache),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "CUDA_VISIBLE_DEVICES": "",
  })
  return environ


def _command(workdir, *overrides):
  return [
      sys.executable,
      "-m",
      "tests.fault_driver",
      f"--workdir={workdir}",
      *_BASE_ARGS,
      *overrides,
  ]


def _run(env, workdir, *overrides, hooks=None, timeout=480):
  result = subprocess.run(
      _command(workdir, *overrides),
      cwd=helpers.REPO,
      env=dict(env, **(hooks or {})),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  return result.returncode, result.stdout + result.stderr


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _load(workdir, step):
  """The whole saved train state of a step, as restored by Orbax (no target)."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return jax.device_get(ocp.StandardCheckpointer().restore(path))


def _assert_equal(a, b, what=""):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=what)


def _assert_same_state(state, saved, what=""):
  """A restored TrainState against a state loaded from a checkpoint (a dict)."""
  for field in ("step", "params", "teacher_params", "rng", "skipped_steps"):
    _assert_equal(jax.device_get(getattr(state, field)), saved[field], f"{what} {field}")


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted run with a checkpoint after every step (does not change the math)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  rc, out = _run(env, workdir, "--config.checkpoint_every=1", "--config.keep_checkpoints=10")
  assert rc == 0, out
  assert _steps(workdir) == list(range(1, TOTAL_STEPS + 1)), out
  return workdir


# ----------------------------------------------------------------- end to end (subprocess)


def test_sigterm_then_sigkill_during_save_then_resume_is_bit_exact(env, reference, tmp_path):
  """SIGTERM at a random step -> checkpoint there, exit 75; the restart is SIGKILLed while
  committing its first checkpoint -> the next restart drops the partial write, restores the
  SIGTERM checkpoint and finishes with exactly the uninterrupted run's state."""
  workdir = str(tmp_path / "run")
  seed = int(os.environ.get("BITS_FAULT_SEED", random.SystemRandom().randrange(1 << 16)))
  signal_after = random.Random(seed).randint(1, 3)
  why = f"(BITS_FAULT_SEED={seed}: SIGTERM after step {signal_after} was printed)"

  proc = subprocess.Popen(
      _command(workdir, "--config.log_every=1"),
      cwd=helpers.REPO,
      env=dict(env, BITS_TEST_STEP_DELAY="0.4"),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(f"step {signal_after}/{TOTAL_STEPS} "):
      proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=300)
  out = "".join(lines)
  assert rc == run_guard.EXIT_PREEMPTED, f"{why}\n{out}"
  stopped = int(
      re.search(r"Stopped by SIGTERM after step (\d+); checkpoint \1 saved", out).group(1)
  )
  assert signal_after <= stopped < TOTAL_STEPS, f"{why}\n{out}"
  assert stopped in _steps(workdir), why
  assert os.path.exists(
      os.path.join(workdir, "checkpoints", str(stopped), checkpoint_lib.MANIFEST)
  ), why
  _assert_equal(_load(workdir, stopped), _load(reference, stopped), why)

  before = _steps(workdir)
  rc, out = _run(env, workdir, "--config.log_every=1", hooks={"BITS_TEST_KILL_AT_COMMIT": "1"})
  assert rc == -signal.SIGKILL, f"{why}\n{out}"
  assert "fault_driver: SIGKILL before committing" in out
  assert _steps(workdir) == before, f"a killed save must not appear as a checkpoint {why}"
  assert glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")), why

  rc, out = _run(env, workdir, "--config.log_every=1")
  assert rc == 0, f"{why}\n{out}"
  assert "Found an incomplete checkpoint write" in out, out
  assert f"Resuming from checkpoint step {stopped} " in out, out
  assert _steps(workdir)[-1] == TOTAL_STEPS
  _assert_equal(
      _load(workdir, TOTAL_STEPS),
      _load(reference, TOTAL_STEPS),
      f"final state after SIGTERM + SIGKILL {why}",
  )


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(env, reference, tmp_path):
  workdir = str(tmp_path / "run")
  seed = int(os.environ.get("BITS_FAULT_SEED", random.SystemRandom().randrange(1 << 16)))
  kill_after = random.Random(seed).randint(1, TOTAL_STEPS - 1)
  proc = subprocess.Popen(
      _command(workdir, "--config.log_every=1", "--config.checkpoint_every=2"),
      cwd=helpers.REPO,
      env=dict(env, BITS_TEST_STEP_DELAY="0.3"),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  for line in proc.stdout:
    if line.startswith(f"step {kill_after}/{TOTAL_STEPS} "):
      proc.kill()
      break
  assert proc.wait(timeout=120) == -signal.SIGKILL
  rc, out = _run(env, workdir, "--config.log_every=1", "--config.checkpoint_every=2")
  assert rc == 0, out
  _assert_equal(
      _load(workdir, TOTAL_STEPS),
      _load(reference, TOTAL_STEPS),
      f"BITS_FAULT_SEED={seed}, SIGKILL after step {kill_after}",
  )


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(env, tmp_path):
  """jax.distributed on localhost, 1 CPU device per process: SIGTERM to process 0 only goes
  through JAX's preemption service; both processes save the same step and exit 75."""
  workdir = str(tmp_path / "run")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  environ = dict(env, BITS_TEST_STEP_DELAY="0.5", XLA_FLAGS=helpers.xla_flags(1))

  def launch(i, stdout):
    return subprocess.Popen(
        _command(
            workdir,
            "--config.log_every=1",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ),
        cwd=helpers.REPO,
        env=environ,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )

  with open(tmp_path / "process1.log", "w") as log1:
    procs = [launch(0, subprocess.PIPE), launch(1, log1)]
    try:
      lines = []
      for line in procs[0].stdout:
        lines.append(line)
        if line.startswith(f"step 2/{TOTAL_STEPS} "):
          procs[0].send_signal(signal.SIGTERM)
      codes = [p.wait(timeout=300) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
  outputs = ["".join(lines), (tmp_path / "process1.log").read_text()]
  assert codes == [run_guard.EXIT_PREEMPTED] * 2, outputs
  stops = [
      int(re.search(r"after step (\d+); checkpoint \1 saved", out).group(1)) for out in outputs
  ]
  assert stops[0] == stops[1] and 2 <= stops[0] < TOTAL_STEPS, outputs
  assert stops[0] in _steps(workdir)


def test_nan_batches_skipped_counted_then_stop_after_n_in_a_row(env, reference, tmp_path):
  """NaN in the batches of updates 2, 4, 5 with max_consecutive_nonfinite=2: update 2 is
  skipped (params unchanged, counted) and the run goes on; 4 and 5 in a row stop it with
  exit 65, the bad state unsaved and the last good checkpoint (4) intact."""
  workdir = str(tmp_path / "run")
  rc, out = _run(
      env,
      workdir,
      "--config.checkpoint_every=1",
      "--config.keep_checkpoints=10",
      "--config.max_consecutive_nonfinite=2",
      hooks={"BITS_TEST_NAN_AT_STEPS": "2,4,5"},
  )
  assert rc == run_guard.EXIT_NONFINITE, out
  assert "step 2: non-finite loss or gradients, update skipped (1 in a row" in out, out
  assert "Stopping at step 5: 2 consecutive updates had a non-finite loss" in out, out
  assert "The last good checkpoint (step 4)" in out, out
  assert _steps(workdir) == [1, 2, 3, 4]

  states = {s: _load(workdir, s) for s in _steps(workdir)}
  _assert_equal(states[1], _load(reference, 1), "before any NaN: the reference run")
  for bad, good in ((2, 1), (4, 3)):
    for part in ("params", "teacher_params", "opt_state"):
      _assert_equal(states[bad][part], states[good][part], f"{part} after skipped {bad}")
    assert int(states[bad]["step"]) == bad
  assert [int(states[s]["skipped_steps"]) for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
  changed = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(
          lambda a, b: bool(np.any(a != b)), states[3]["params"], states[2]["params"]
      )
  )
  assert any(changed), "update 3 (finite) must train on after the skipped update 2"


def test_two_runs_on_one_workdir_second_is_refused_before_compiling(reference, tmp_path):
  config = helpers.load_config("fashion_mnist", "test")
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  with run_guard.WorkdirLock(workdir):
    start = time.time()
    with pytest.raises(run_guard.WorkdirError, match=r"in use by another run \(pid \d+"):
      train.train(config, workdir)
    assert time.time() - start < 60
  with run_guard.WorkdirLock(workdir):  # released on exit
    pass


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_file_system_without_flock_gets_the_heartbeat_lock(code, tmp_path, monkeypatch, capsys):
  """NFS without a lock daemon (ENOLCK), Lustre without flock (ENOSYS): the run starts, with
  a best-effort lock that still refuses a second run, instead of exit 73 on every start."""

  def no_flock(fd, operation):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(run_guard.fcntl, "flock", no_flock)
  workdir = str(tmp_path)
  with run_guard.WorkdirLock(workdir):
    assert "file system without flock" in capsys.readouterr().out
    with pytest.raises(run_guard.WorkdirError, match=rf"in use by another run \(pid {os.getpid()}"):
      run_guard.WorkdirLock(workdir).__enter__()
  assert not os.path.exists(os.path.join(workdir, run_guard.LOCK_FILE))
  with run_guard.WorkdirLock(workdir):  # released on exit
    pass


def test_lock_of_a_killed_run_is_released(env, tmp_path):
  workdir = str(tmp_path)
  holder = subprocess.Popen(
      [
          sys.executable,
          "-c",
          (
              "import sys, time; from bits_jax import run_guard; "
              f"run_guard.WorkdirLock({workdir!r}).__enter__(); print('locked', flush=True); "
              "time.sleep(600)"
          ),
      ],
      cwd=helpers.REPO,
      env=env,
      stdout=subprocess.PIPE,
      text=True,
  )
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(run_guard.WorkdirError, match=f"pid {holder.pid} on"):
    run_guard.WorkdirLock(workdir).__enter__()
  holder.kill()
  holder.wait()
  with run_guard.WorkdirLock(workdir):
    pass


# ------------------------------------------------------------- damaged checkpoints (in process)


def _restore(workdir):
  """`Checkpoints.restore_or_init` of the test preset on 2 devices, as `train` restores."""
  config = helpers.load_config("fashion_mnist", "test")
  mesh = sharding_lib.make_mesh(config, jax.devices()[:2])
  checkpoints = checkpoint_lib.Checkpoints(workdir, config)
  return jax.device_get(checkpoints.restore_or_init(train_state.build(config), config, mesh))


def _largest_file(step_dir):
  files = [
      p
      for p in glob.glob(os.path.join(step_dir, "**"), recursive=True)
      if os.path.isfile(p) and not p.endswith(checkpoint_lib.MANIFEST)
  ]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


_DAMAGE = {
    "truncated": (lambda d: _truncate(_largest_file(d)), "truncated"),
    "flipped byte": (lambda d: _flip_byte(_largest_file(d)), "does not match its SHA-256"),
    "deleted file": (lambda d: os.remove(_largest_file(d)), "missing"),
    "garbage manifest": (
        lambda d: open(os.path.join(d, checkpoint_lib.MANIFEST), "w").write("{not json"),
        "unreadable manifest",
    ),
    "truncated, no manifest": (
        lambda d: (
            os.remove(os.path.join(d, checkpoint_lib.MANIFEST)),
            _truncate(_largest_file(d)),
        ),
        "Orbax cannot restore it",
    ),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_checkpoint_is_detected_moved_aside_and_previous_restored(
    damage, reference, tmp_path, capsys
):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  apply, message = _DAMAGE[damage]
  apply(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS)))
  state = _restore(workdir)
  out = capsys.readouterr().out
  assert f"Checkpoint step {TOTAL_STEPS} in" in out and "is damaged" in out, out
  assert message in out, out
  assert f"Resuming from checkpoint step {TOTAL_STEPS - 1} " in out, out
  assert _steps(workdir) == list(range(1, TOTAL_STEPS))
  moved = glob.glob(os.path.join(workdir, checkpoint_lib.QUARANTINE, f"{TOTAL_STEPS}-*"))
  assert len(moved) == 1, "a damaged checkpoint is moved aside, never deleted"
  _assert_same_state(state, _load(reference, TOTAL_STEPS - 1))


def test_intact_checkpoint_that_does_not_restore_is_an_error_not_damage(
    reference, tmp_path, monkeypatch
):
  """Out of device memory (or another Orbax) at restore: the files match their manifest, so
  nothing is quarantined (all steps were, and the run restarted from step 0)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.20GiB")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
  with pytest.raises(
      checkpoint_lib.CheckpointRestoreError,
      match=rf"step {TOTAL_STEPS} .*matches its manifest.*RESOURCE_EXHAUSTED.*not moved",
  ):
    _restore(workdir)
  assert _steps(workdir) == list(range(1, TOTAL_STEPS + 1))
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.QUARANTINE))


def test_committed_checkpoint_without_manifest_is_validated_and_kept(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  manifest = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), checkpoint_lib.MANIFEST)
  os.remove(manifest)
  state = _restore(workdir)
  assert "had no manifest" in capsys.readouterr().out
  assert int(state.step) == TOTAL_STEPS and os.path.exists(manifest)


def test_all_checkpoints_damaged_starts_over_and_says_so(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  for step in _steps(workdir):
    _truncate(_largest_file(os.path.join(workdir, "checkpoints", str(step))))
  state = _restore(workdir)
  assert int(state.step) == 0
  assert "No intact checkpoint left" in capsys.readouterr().out
  assert len(os.listdir(os.path.join(workdir, checkpoint_lib.QUARANTINE))) == TOTAL_STEPS


def test_checkpoint_of_another_config_is_refused_not_quarantined(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  config = helpers.load_config("fashion_mnist", "test")
  config.objective.bits.num_bits = 16
  mesh = sharding_lib.make_mesh(config, jax.devices()[:2])
  checkpoints = checkpoint_lib.Checkpoints(workdir, config)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="does not fit"):
    checkpoints.restore_or_init(train_state.build(config), config, mesh)
  assert _steps(workdir) == list(range(1, TOTAL_STEPS + 1))


def test_refused_resume_leaves_config_json_as_the_checkpoints_were_written(reference, tmp_path):
  """Allowed as a config change but refused by the checkpoint: config.json must still hold
  the config the checkpoints fit, which the error message tells the user to resume with."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    before = f.read()
  config = helpers.load_config("fashion_mnist", "test")
  config.objective.bits.num_bits = 16
  config.allow_config_change = "objective.bits.num_bits"
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="does not fit"):
    train.train(config, workdir, devices=jax.devices()[:2])
  with open(path) as f:
    assert f.read() == before


# ------------------------------------------------------------ retention and disk (in process)


def _tiny_state(value):
  return {"w": np.full((64, 64), value, np.float32), "step": np.asarray(value, np.int32)}


def test_old_checkpoints_deleted_only_after_the_next_one_is_complete(tmp_path, monkeypatch):
  config = helpers.load_config("fashion_mnist", "test")
  config.keep_checkpoints = 2
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), config)
  for step in (1, 2, 3):
    checkpoints.save(step, _tiny_state(step))
  checkpoints.finalize()
  assert checkpoints.steps() == [2, 3]

  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  async def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
  checkpoints.save(4, _tiny_state(4))
  with pytest.raises(
      checkpoint_lib.CheckpointWriteError,
      match=r"step 4 .*disk is full.*Intact checkpoints: \[2, 3\]",
  ):
    checkpoints.finalize()
  monkeypatch.undo()
  for step in (2, 3):
    step_dir = os.path.join(checkpoints.directory, str(step))
    assert checkpoint_lib.manifest_problem(step_dir) is None


def test_save_refused_when_the_disk_cannot_hold_it(tmp_path, monkeypatch):
  config = helpers.load_config("fashion_mnist", "test")
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), config)
  checkpoints.save(1, _tiny_state(1))
  checkpoints.finalize()
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(
      checkpoint_lib.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000)
  )
  with pytest.raises(
      checkpoint_lib.CheckpointWriteError,
      match=r"step 2 .*disk is full.*Intact checkpoints: \[1\].*rerun",
  ):
    checkpoints.save(2, _tiny_state(2))
  assert checkpoints.steps() == [1]
  assert not glob.glob(os.path.join(checkpoints.directory, "2*"))


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 1 MiB tmpfs (root in a container that allows mounts), else skip."""
  mount_point = tmp_path / "tmpfs"
  mount_point.mkdir()
  if subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
  ).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    yield str(mount_point)
  finally:
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_and_read_only_disks_give_clear_errors_and_keep_checkpoints(small_tmpfs, monkeypatch):
  config = helpers.load_config("fashion_mnist", "test")
  workdir = os.path.join(small_tmpfs, "run")
  run_guard.check_writable(workdir)
  checkpoints = checkpoint_lib.Checkpoints(workdir, config)
  checkpoints.save(1, _tiny_state(1))
  checkpoints.finalize()
  # A real ENOSPC from the writes (the up-front check is bypassed to reach them).
  monkeypatch.setattr(checkpoints, "_check_free_space", lambda step, state: None)
  big = {"w": np.random.RandomState(0).randn(512, 1024).astype(np.float32)}  # 2 MiB
  with pytest.raises(
      checkpoint_lib.CheckpointWriteError, match=r"step 2 .*disk is full.*Intact.*\[1\]"
  ):
    checkpoints.save(2, big)
    checkpoints.finalize()
  assert checkpoint_lib.manifest_problem(os.path.join(workdir, "checkpoints", "1")) is None

  subprocess.run(["mount", "-o", "remount,ro", small_tmpfs], check=True)
  with pytest.raises(run_guard.WorkdirError, match="read-only.*untouched"):
    run_guard.check_writable(workdir)
  assert checkpoint_lib.manifest_problem(os.path.join(workdir, "checkpoints", "1")) is None


# ------------------------------------------------------------------- guard and config resume


def test_nonfinite_guard_policies():
  config = helpers.load_config("fashion_mnist", "test")
  config.max_consecutive_nonfinite = 3
  guard = run_guard.NonFiniteGuard(config)
  assert [guard.observe(s, bad) for s, bad in enumerate([True, False, True, True])] == [None] * 4
  assert "3 consecutive updates" in guard.observe(5, True)
  assert guard.total == 4
  config.on_nonfinite = "stop"
  assert "on_nonfinite='stop'" in run_guard.NonFiniteGuard(config).observe(7, True)
  assert run_guard.NonFiniteGuard(config).observe(7, False) is None


def test_resume_with_a_changed_config_is_refused_before_compiling(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  config = helpers.load_config("fashion_mnist", "test")
  config.evals.knn.at_end = False
  config.checkpoint_every = 1
  config.keep_checkpoints = 10
  trained_with = config.optim.learning_rate  # the preset's, stored by the reference run
  config.optim.learning_rate = 3e-3
  start = time.time()
  with pytest.raises(
      config_validation.ConfigError,
      match=rf"(?s)optim\.learning_rate: {re.escape(repr(trained_with))} in the workdir, "
      r"0\.003 now.*allow_config_change=optim\.learning_rate",
  ):
    train.train(config, workdir, devices=jax.devices()[:2])
  assert time.time() - start < 60
  assert _steps(workdir) == list(range(1, TOTAL_STEPS + 1))


def test_checkpoints_context_closes_the_manager_and_keeps_the_error(tmp_path, monkeypatch):
  config = helpers.load_config("fashion_mnist", "test")
  closed = []

  def failing_close(self):
    closed.append(self.directory)
    raise OSError("bucket gone")

  monkeypatch.setattr(ocp.CheckpointManager, "close", failing_close)
  # The run's own error surfaces, not the close's.
  with pytest.raises(RuntimeError, match="step failed"):
    with checkpoint_lib.Checkpoints(tmp_path, config):
      raise RuntimeError("step failed")
  assert len(closed) == 1
  with pytest.raises(OSError, match="bucket gone"):  # without an error in flight it raises
    with checkpoint_lib.Checkpoints(tmp_path, config):
      pass
  assert len(closed) == 2
