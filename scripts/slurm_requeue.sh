#!/usr/bin/env bash
#SBATCH --job-name=bits_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# A BITS training job that requeues itself until the run is done:
#
#   sbatch scripts/slurm_requeue.sh --config=configs/imagenet_vitb16.py:ep100 \
#       --workdir=/shared/runs/vitb16_ep100 --config.input.data_dir=/data/tensorflow_datasets
#
# (adapt the #SBATCH lines: nodes, one task per GPU, time limit). Every task runs
# `python -m bits_jax.main ARGS` (JAX finds the other processes through SLURM); the workdir
# must be shared by all nodes. 300 s before the time limit SLURM sends SIGTERM to the tasks:
# they finish the step in flight, save a checkpoint and exit 75, and the job requeues itself;
# the next start resumes from that checkpoint. Exit status of bits_jax.main:
#   0   done                               -> stop
#   75  preempted / stopped with a save    -> scontrol requeue (at most MAX_REQUEUES times)
#   78  config error                       -> stop, report (fix the command)
#   73  workdir or disk problem            -> stop, report (lock held, read-only or full disk)
#   65  stopped on non-finite loss         -> stop, report (last good checkpoint is kept)
# Anything else (a crash, a lost node) stops without requeueing: sbatch again to resume.
# Environment: PYTHON (default: python), MAX_REQUEUES (default: 100).
set -uo pipefail

PYTHON="${PYTHON:-python}"
MAX_REQUEUES="${MAX_REQUEUES:-100}"
restarts="${SLURM_RESTART_COUNT:-0}"
cd "${SLURM_SUBMIT_DIR:-.}" || exit 73

echo "bits_jax: job ${SLURM_JOB_ID:-?}, start $((restarts + 1)), $(date -u +%FT%TZ)"
# A SIGTERM to this script (preemption, scancel) must not end it before the tasks have saved
# and exited: trapped here (the tasks get their own), then we keep waiting for srun.
trap 'echo "bits_jax: SIGTERM received; waiting for the tasks to save and exit"' TERM
srun "$PYTHON" -m bits_jax.main "$@" &
pid=$!
while :; do
  wait "$pid"
  status=$?
  # wait returns >128 when a trapped signal interrupts it; srun is then still there.
  if ((status > 128)) && kill -0 "$pid" 2>/dev/null; then
    continue
  fi
  break
done

case "$status" in
  0)
    echo "bits_jax: run complete."
    exit 0
    ;;
  75)
    if ((restarts >= MAX_REQUEUES)); then
      echo "bits_jax: preempted (75) after ${restarts} requeues (MAX_REQUEUES=${MAX_REQUEUES}):" \
        "not requeued; sbatch again to resume." >&2
      exit 75
    fi
    echo "bits_jax: preempted (75): checkpoint saved; requeueing job ${SLURM_JOB_ID:-?}."
    if [[ -z "${SLURM_JOB_ID:-}" ]] || ! scontrol requeue "$SLURM_JOB_ID"; then
      echo "bits_jax: could not requeue (not under sbatch, or requeueing not allowed here):" \
        "sbatch again to resume." >&2
    fi
    exit 75
    ;;
  78) reason="config error: fix the command or config (message above)" ;;
  73) reason="workdir or disk problem (lock held by another run, read-only or full disk)" ;;
  65) reason="stopped on non-finite loss; the last good checkpoint is kept" ;;
  *) reason="unexpected exit (a crash or a lost node?): sbatch again to resume" ;;
esac
echo "bits_jax: exit status ${status}: ${reason}; not requeued." >&2
exit "$status"
