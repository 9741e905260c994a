"""Two real processes (4 fake CPU devices each, localhost coordinator) run the entry point and
match a single process with 8 devices."""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bits_jax import checkpoint as checkpoint_lib
from bits_jax import distributed
from bits_jax import sharding as sharding_lib
from bits_jax import train
from bits_jax import train_state
from tests import helpers

_OVERRIDES = {
    "total_steps": 3,
    "objective.head.reset_every_steps": 2,
    "mesh.data": 2,
    "mesh.fsdp": 4,
    "fsdp_min_size": 256,
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir: str, port: int, process_id: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.xla_flags(4))
  command = [
      sys.executable,
      "-m",
      "bits_jax.main",
      "--config=configs/fashion_mnist.py:test",
      f"--workdir={workdir}",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={process_id}",
  ]
  command += [f"--config.{k}={v}" for k, v in _OVERRIDES.items()]
  return subprocess.Popen(
      command,
      cwd=helpers.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


@pytest.mark.slow  # three training runs and three k-NN evaluations: > 2 minutes on 2 cores
def test_two_processes_match_single_process(tmp_path):
  """Training, collective checkpoint, process-0-only logs and the gathered k-NN evaluation."""
  workdir = str(tmp_path / "two_processes")
  port = _free_port()
  procs = [_launch(workdir, port, i) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=600)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i} failed:\n{out[-6000:]}"

  # Only process 0 prints progress and writes event files / config.json / results.json.
  assert "step 2/3" in outputs[0] and "step 2/3" not in outputs[1]
  assert "k-NN top-1" in outputs[0] and "k-NN top-1" not in outputs[1]
  events = [os.path.basename(f) for f in glob.glob(os.path.join(workdir, "events.out.*"))]
  assert events and all(f".{procs[0].pid}." in name for name in events), events
  assert os.path.exists(os.path.join(workdir, "config.json"))
  with open(os.path.join(workdir, "results.json")) as f:
    two_process_results = json.load(f)

  config = helpers.load_config("fashion_mnist", "test")
  for key, value in _OVERRIDES.items():  # as --config.<dotted key>=<value> does
    *sections, name = key.split(".")
    section = config
    for part in sections:
      section = section[part]
    section[name] = value
  single_results = train.train_and_evaluate(config, str(tmp_path / "one_process"))
  # k-NN over features and labels gathered from both processes, as on one process.
  for key in ("knn_top1", "knn_top1_random_init"):
    assert abs(two_process_results[key] - single_results[key]) <= 2 / 256, key

  # The checkpoint the two processes wrote together, restored here on one process.
  mesh = sharding_lib.make_mesh(config)
  target = sharding_lib.abstract_state(train_state.build(config), config, mesh)
  restore = lambda directory: checkpoint_lib.checkpoint_manager(directory, config).restore(
      3, args=ocp.args.StandardRestore(target)
  )
  single, restored = restore(str(tmp_path / "one_process")), restore(workdir)
  # Gloo's cross-process all-reduce sums in another order than one process does; Adam's
  # normalized update turns those 1e-7 gradient differences into ~1e-5 in a few weights.
  # Adam's first steps move every weight by about lr (up to the preset's 1.4e-3), so 1e-4 still
  # catches a wrong batch or a loss computed per process.
  tree_close = lambda a, b: jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4),
      jax.device_get(a),
      jax.device_get(b),
  )
  tree_close(single.params, restored.params)
  tree_close(single.teacher_params, restored.teacher_params)
  tree_close(single.opt_state, restored.opt_state)
  assert int(restored.step) == 3


def test_inconsistent_process_flags_are_a_usage_error_not_a_traceback(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "bits_jax.main",
          "--config=configs/fashion_mnist.py:test",
          f"--workdir={tmp_path}",
          "--coordinator_address=localhost:1234",
      ],
      cwd=helpers.REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 1, result.stderr
  assert "pass all three" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_distributed_args_and_detection():
  args = distributed.args_from(
      environ={
          "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
          "JAX_NUM_PROCESSES": "4",
          "JAX_PROCESS_ID": "2",
      }
  )
  assert args == distributed.DistributedArgs("10.0.0.1:1234", 4, 2) and args.explicit
  flags_win = distributed.args_from("h:1", 2, 0, environ={"JAX_PROCESS_ID": "5"})
  assert flags_win == distributed.DistributedArgs("h:1", 2, 0)
  assert not distributed.args_from(environ={}).explicit
  with pytest.raises(ValueError, match="pass all three"):
    distributed.args_from("h:1", environ={})
  with pytest.raises(ValueError, match="without coordinator_address"):
    distributed.args_from(num_processes=2, process_id=0, environ={})
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
    distributed.args_from("h:1", 2, 2, environ={})

  assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == "slurm"
  assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
  assert distributed.detected_cluster({"JAX_PLATFORMS": "cpu"}) is None
  # A single process with nothing set does not start the service.
  assert (
      distributed.initialize(
          "auto", distributed.DistributedArgs(), environ={"JAX_PLATFORMS": "cpu"}
      )
      is False
  )
  with pytest.raises(ValueError, match="use one of"):
    distributed.initialize("maybe")
