"""Multi-process start-up: `jax.distributed.initialize` when the run spans several processes.

Every process runs the same command. How the processes find each other:
  * Cloud TPU VM pod slices, SLURM and Open MPI: detected from the environment, and JAX
    fills in coordinator, process count and id itself (`jax.distributed.initialize()`).
  * Anything else (several GPU nodes, or several processes on one machine): pass
    `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (flags of
    `bits_jax.main`) or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
A single process with none of these runs without the distributed service.

This must run before anything touches the devices (`jax.devices()`, any computation).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Mapping, Optional

import jax

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
  """Explicit process-group arguments; None = let JAX detect them."""

  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def args_from(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    environ: Mapping[str, str] = os.environ,
) -> DistributedArgs:
  """Flags first, then the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID env."""

  def pick(value, env_name, cast):
    if value is not None:
      return value
    raw = environ.get(env_name)
    return None if raw in (None, "") else cast(raw)

  args = DistributedArgs(
      coordinator_address=pick(coordinator_address or None, "JAX_COORDINATOR_ADDRESS", str),
      num_processes=pick(num_processes, "JAX_NUM_PROCESSES", int),
      process_id=pick(process_id, "JAX_PROCESS_ID", int),
  )
  if args.explicit and (args.num_processes is None or args.process_id is None):
    raise ValueError(
        f"coordinator_address={args.coordinator_address!r} is set but "
        "num_processes / process_id are not: pass all three "
        "(--coordinator_address, --num_processes, --process_id) or none."
    )
  if not args.explicit and (args.num_processes is not None or args.process_id is not None):
    raise ValueError(
        "num_processes / process_id are set without coordinator_address: add "
        "--coordinator_address=HOST:PORT (the address of process 0)."
    )
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    raise ValueError(f"process_id={args.process_id} must be in [0, {args.num_processes}).")
  return args


def detected_cluster(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """'tpu', 'slurm' or 'ompi' when this process is one of several JAX can find by itself."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1 and (
      "SLURM_JOB_ID" in environ
  ):
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "ompi"
  if _on_cloud_tpu_vm(environ):
    return "tpu"
  return None


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
  # A TPU VM has TPU chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5+) and libtpu installed;
  # JAX then reads the slice's worker list from the VM's metadata server.
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms:
    return False
  has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_chips and importlib.util.find_spec("libtpu") is not None


def initialize(
    mode: str = "auto",
    args: DistributedArgs = DistributedArgs(),
    environ: Mapping[str, str] = os.environ,
) -> bool:
  """Starts the distributed service if the run spans several processes; True if started.

  Args:
    mode: 'auto' (explicit arguments, or a detected TPU pod / SLURM / Open MPI job), 'on'
      (always call `jax.distributed.initialize`, failing if JAX cannot find the group) or
      'off' (single process).
    args: explicit coordinator address, process count and id (see `args_from`).
    environ: the environment to inspect (tests pass their own).
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r}: use one of {MODES}.")
  if mode == "off":
    if args.explicit:
      raise ValueError("--distributed=off contradicts --coordinator_address: drop one.")
    return False
  if args.explicit:
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    return True
  if mode == "on" or detected_cluster(environ) is not None:
    jax.distributed.initialize()
    return True
  return False


def describe() -> str:
  """One line for the log: process, device counts and platform."""
  return (
      f"process {jax.process_index()} of {jax.process_count()}: "
      f"{jax.local_device_count()} local of {jax.device_count()} "
      f"{jax.devices()[0].platform} devices"
  )
