"""scripts/run_tpu.sh and scripts/slurm_requeue.sh against stand-in gcloud / srun / scontrol."""

import os
import pathlib
import signal
import subprocess
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN_TPU = REPO / "scripts" / "run_tpu.sh"
SLURM = REPO / "scripts" / "slurm_requeue.sh"

# Logs its arguments (NUL-terminated, then an END marker); keeps what `scp` is asked to copy.
_GCLOUD = """#!/usr/bin/env bash
printf '%s\\0' "$@" END >> "$STUB_LOG"
if [[ "$4" == scp ]]; then cp "$5" "$STUB_DIR/archive.tar.gz"; fi
"""
_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_DIR/srun_args"
if [[ -n "${STUB_WAIT:-}" ]]; then  # until the test creates this file
  while [[ ! -e "$STUB_WAIT" ]]; do sleep 0.05; done
fi
exit "$STUB_STATUS"
"""
_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol_calls"
"""


def _stubs(tmp_path, **scripts):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return dict(
      os.environ,
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      STUB_DIR=str(tmp_path),
      STUB_LOG=str(tmp_path / "gcloud.log"),
  )


def _gcloud_calls(tmp_path) -> list[list[str]]:
  calls, call = [], []
  for arg in (tmp_path / "gcloud.log").read_text().split("\0")[:-1]:
    if arg == "END":
      calls.append(call)
      call = []
    else:
      call.append(arg)
  return calls


@pytest.mark.parametrize("script", [RUN_TPU, SLURM])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


def _run_remote(call, env, home, program) -> list[str]:
  """Runs a `gcloud ... ssh --command=C` call's C here, as the worker's login shell would,
  with HOME=home and a stand-in ~/bits_venv/bin/PROGRAM; returns PROGRAM's arguments."""
  (home / "bits_jax").mkdir(parents=True, exist_ok=True)
  (home / "bits_venv" / "bin").mkdir(parents=True, exist_ok=True)
  stub = home / "bits_venv" / "bin" / program
  stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/args"\n')
  stub.chmod(0o755)
  command = call[-1][len("--command=") :]
  subprocess.run(["bash", "-c", command], check=True, env=dict(env, HOME=str(home)))
  return (home / "args").read_text().splitlines()


def test_run_tpu_prepares_data_on_worker_0_then_trains_on_all(tmp_path):
  env = _stubs(tmp_path, gcloud=_GCLOUD)
  env.update(TPU="bits-v4", ZONE="us-central2-b", WORKDIR="gs://b/runs/x", DATA_DIR="gs://b/tfds")
  subprocess.run(
      ["bash", str(RUN_TPU), "run", "--config.total_steps=10", "--config.name=it's two words"],
      check=True,
      env=env,
  )
  data, train = _gcloud_calls(tmp_path)
  assert data[:5] == train[:5] == ["compute", "tpus", "tpu-vm", "ssh", "bits-v4"]
  assert "--worker=0" in data and "--zone=us-central2-b" in data
  assert "--worker=all" in train
  home = tmp_path / "home"
  assert _run_remote(data, env, home, "tfds") == ["build", "imagenet2012", "--data_dir=gs://b/tfds"]
  # The training command reaches every worker with its arguments intact.
  assert _run_remote(train, env, home, "python") == [
      "-m",
      "bits_jax.main",
      "--config=configs/imagenet_vitb16.py:ep100",
      "--workdir=gs://b/runs/x",
      "--config.input.data_dir=gs://b/tfds",
      "--config.total_steps=10",
      "--config.name=it's two words",
  ]
  assert (home / "bits_jax_train.log").exists()


def test_run_tpu_setup_copies_the_package_only(tmp_path):
  env = _stubs(tmp_path, gcloud=_GCLOUD)
  env.update(TPU="bits-v4", ZONE="z", PROJECT="p")
  subprocess.run(["bash", str(RUN_TPU), "setup"], check=True, env=env)
  scp, install = _gcloud_calls(tmp_path)
  assert scp[3] == "scp" and scp[5] == "bits-v4:bits_jax.tar.gz" and "--worker=all" in scp
  assert "--project=p" in scp and "--worker=all" in install
  assert "python3.11-venv" in install[-1] and "[tpu]" in install[-1]
  with tarfile.open(tmp_path / "archive.tar.gz") as archive:
    names = archive.getnames()
  assert {"setup.cfg", "bits_jax/__init__.py", "scripts/run_tpu.sh"} <= set(names)
  for excluded in (".git/", ".venv/", "workdirs/", "__pycache__/"):
    assert not any(excluded in f"{name}/" for name in names), excluded


# A Python without its venv module (STUB_NO_VENV=1) whose venvs hold logging stand-ins.
_PYTHON311 = """#!/usr/bin/env bash
echo "python3.11 $*" >> "$STUB_DIR/worker.log"
if [[ "$1" == -c ]]; then [[ "${STUB_NO_VENV:-0}" != 1 ]]; exit; fi
mkdir -p "$3/bin"
for tool in pip python; do
  printf '#!/usr/bin/env bash\\necho "%s $*" >> "$STUB_DIR/worker.log"\\n' "$tool" \\
    > "$3/bin/$tool"
  chmod +x "$3/bin/$tool"
done
"""
_SUDO = """#!/usr/bin/env bash
echo "sudo $*" >> "$STUB_DIR/worker.log"
"""


@pytest.mark.parametrize("venv_missing", [True, False])
def test_run_tpu_worker_setup_installs_python_venv_only_where_missing(tmp_path, venv_missing):
  env = _stubs(tmp_path, gcloud=_GCLOUD, sudo=_SUDO, **{"python3.11": _PYTHON311})
  env.update(TPU="bits-v4", ZONE="z", STUB_NO_VENV="1" if venv_missing else "0")
  subprocess.run(["bash", str(RUN_TPU), "setup"], check=True, env=env)
  home = tmp_path / "home"
  (home / "bits_jax").mkdir(parents=True)
  (home / "bits_jax" / "stale.py").write_text("")  # from an older copy: must go
  (tmp_path / "archive.tar.gz").rename(home / "bits_jax.tar.gz")
  command = _gcloud_calls(tmp_path)[1][-1][len("--command=") :]
  subprocess.run(["bash", "-c", command], check=True, env=dict(env, HOME=str(home)))
  log = (tmp_path / "worker.log").read_text().splitlines()
  apt = [line for line in log if line.startswith("sudo") and "apt-get install" in line]
  assert [line.endswith("apt-get install -y -qq python3.11 python3.11-venv") for line in apt] == (
      [True] if venv_missing else []
  )
  assert f"python3.11 -m venv {home}/bits_venv" in log
  assert f"pip install -q -e {home}/bits_jax[tpu]" in log
  assert (home / "bits_jax" / "setup.cfg").exists()
  assert not (home / "bits_jax" / "stale.py").exists()


def test_run_tpu_refuses_a_host_local_workdir_and_missing_settings(tmp_path):
  env = _stubs(tmp_path, gcloud=_GCLOUD)
  env.update(TPU="t", ZONE="z", WORKDIR="/tmp/run", DATA_DIR="gs://b/tfds")
  proc = subprocess.run(
      ["bash", str(RUN_TPU), "run"], env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 2 and "gs://BUCKET" in proc.stderr
  env.pop("TPU")
  proc = subprocess.run(
      ["bash", str(RUN_TPU), "ssh", "ls"], env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 2 and "set TPU" in proc.stderr
  assert not (tmp_path / "gcloud.log").exists()


@pytest.mark.parametrize(
    "status,requeued,message",
    [
        (0, False, "run complete"),
        (75, True, "requeueing"),
        (78, False, "config error"),
        (73, False, "workdir or disk"),
        (65, False, "non-finite"),
        (1, False, "unexpected"),
    ],
)
def test_slurm_requeues_only_when_preempted(tmp_path, status, requeued, message):
  env = _stubs(tmp_path, srun=_SRUN, scontrol=_SCONTROL)
  env.update(STUB_STATUS=str(status), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path))
  proc = subprocess.run(
      ["bash", str(SLURM), "--config=c.py", "--workdir=/w"],
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == status
  assert message in proc.stdout + proc.stderr
  assert (tmp_path / "srun_args").read_text().split() == [
      "python",
      "-m",
      "bits_jax.main",
      "--config=c.py",
      "--workdir=/w",
  ]
  calls = tmp_path / "scontrol_calls"
  if requeued:
    assert calls.read_text() == "requeue 4242\n"
  else:
    assert not calls.exists()
    assert status == 0 or "not requeued" in proc.stderr


def test_slurm_stops_requeueing_after_max_and_survives_sigterm(tmp_path):
  env = _stubs(tmp_path, srun=_SRUN, scontrol=_SCONTROL)
  env.update(
      STUB_STATUS="75",
      SLURM_JOB_ID="7",
      SLURM_SUBMIT_DIR=str(tmp_path),
      SLURM_RESTART_COUNT="3",
      MAX_REQUEUES="3",
  )
  proc = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 75 and "MAX_REQUEUES=3" in proc.stderr
  assert not (tmp_path / "scontrol_calls").exists()

  # SIGTERM to the batch script while the tasks save: it waits for them, then requeues.
  release = tmp_path / "release"
  (tmp_path / "srun_args").unlink()  # from the run above
  env.update(SLURM_RESTART_COUNT="0", STUB_WAIT=str(release))
  with subprocess.Popen(["bash", str(SLURM)], env=env, stdout=subprocess.PIPE, text=True) as proc:
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun_args").exists():  # srun started: the trap is set
      assert time.monotonic() < deadline, "srun stand-in never started"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert proc.poll() is None, "the batch script died on SIGTERM before its tasks"
    release.touch()
    stdout, _ = proc.communicate(timeout=30)
  assert proc.returncode == 75 and "SIGTERM received" in stdout
  assert (tmp_path / "scontrol_calls").read_text() == "requeue 7\n"
