#!/usr/bin/env bash
# BITS on a Cloud TPU VM pod slice: every worker (host) runs the same command.
#
#   export TPU=bits-v4-64 ZONE=us-central2-b ACCELERATOR=v4-64
#   export WORKDIR=gs://MY_BUCKET/runs/vitb16_ep100 DATA_DIR=gs://MY_BUCKET/tensorflow_datasets
#   scripts/run_tpu.sh create            # the TPU VM slice
#   scripts/run_tpu.sh setup             # copy this package to every worker, venv, pip install
#   scripts/run_tpu.sh run [--config.X=Y ...]   # data once (worker 0), then train on all workers
#   scripts/run_tpu.sh ssh 'tail -n 3 ~/bits_jax_train.log'   # a command on every worker
#   scripts/run_tpu.sh delete
#
# Commands:
#   create  gcloud compute tpus tpu-vm create ($ACCELERATOR, image $TPU_VERSION).
#   setup   copy: the package only (tracked and not-ignored files of this checkout, so no
#           .git, .venv or workdirs) as a tarball to every worker, unpacked into ~/bits_jax;
#           install $PYTHON and its venv module where missing (the stock Ubuntu 22.04 image
#           has Python 3.10, too old for current JAX); ~/bits_venv with `pip install -e
#           '.[tpu]'`. Rerun after changing the code (the venv is kept).
#   data    `tfds build $DATASET --data_dir=$DATA_DIR` on worker 0 only, once, before training
#           (imagenet2012 needs ILSVRC2012_img_{train,val}.tar in $DATA_DIR/downloads/manual/;
#           an already prepared dataset is left as it is).
#   run     data, then `python -m bits_jax.main --config=$CONFIG --workdir=$WORKDIR
#           --config.input.data_dir=$DATA_DIR ARGS` on all workers (log: ~/bits_jax_train.log
#           on each). Exit status 75 means preempted: `run` again resumes from the checkpoint.
#   ssh     ARGS as a command on all workers; without ARGS a shell on worker 0.
#   delete  delete the slice.
#
# Environment: TPU, ZONE (always); PROJECT (default: gcloud's); ACCELERATOR (create);
# TPU_VERSION (default tpu-ubuntu2204-base); SPOT=1 to create a spot slice; PYTHON (default
# python3.11); CONFIG (default configs/imagenet_vitb16.py:ep100); WORKDIR (a gs:// path, shared
# by all hosts; or any path on a filesystem mounted on every host, with SHARED_WORKDIR=1);
# DATA_DIR; DATASET (default imagenet2012). The TPU VM's service account needs read/write
# access to the bucket.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
PYTHON="${PYTHON:-python3.11}"
CONFIG="${CONFIG:-configs/imagenet_vitb16.py:ep100}"
DATASET="${DATASET:-imagenet2012}"
# Expanded on the workers, not here.
REMOTE_CODE='$HOME/bits_jax'
REMOTE_VENV='$HOME/bits_venv'
TPU_ARGS=()
PACK_DIR=""
trap '[[ -z "$PACK_DIR" ]] || rm -rf "$PACK_DIR"' EXIT

die() {
  echo "run_tpu.sh: $*" >&2
  exit 2
}

need() {
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "set $name (see the top of scripts/run_tpu.sh)."
  done
}

# TPU_ARGS: the gcloud arguments every command shares (after `need TPU ZONE`).
set_tpu_args() {
  TPU_ARGS=("$TPU" "--zone=$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then TPU_ARGS+=("--project=$PROJECT"); fi
}

# remote WORKER COMMAND: COMMAND (one string, run by bash) on WORKER (all, 0, 1, ...).
remote() {
  local worker="$1" command="$2"
  set_tpu_args
  gcloud compute tpus tpu-vm ssh "${TPU_ARGS[@]}" --worker="$worker" \
    --command="bash -c $(single_quoted "set -euo pipefail; $command")"
}

# 'TEXT' for a shell, with any ' inside escaped.
single_quoted() {
  local q="'\\''"
  printf "'%s'" "${1//\'/$q}"
}

# The package as a tarball: git's tracked + untracked-but-not-ignored files that exist.
pack() {
  local out="$1"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
      tar --null -T - -czf "$out")
  else
    tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ \
      --exclude='*.egg-info' -czf "$out" .
  fi
}

cmd_create() {
  need TPU ZONE ACCELERATOR
  set_tpu_args
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  gcloud compute tpus tpu-vm create "${TPU_ARGS[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$TPU_VERSION" ${spot[@]+"${spot[@]}"}
}

cmd_setup() {
  need TPU ZONE
  set_tpu_args
  PACK_DIR="$(mktemp -d)"
  pack "$PACK_DIR/bits_jax.tar.gz"
  gcloud compute tpus tpu-vm scp "$PACK_DIR/bits_jax.tar.gz" "$TPU:bits_jax.tar.gz" \
    "${TPU_ARGS[@]:1}" --worker=all
  remote all "
    if ! command -v $PYTHON >/dev/null || ! $PYTHON -c 'import ensurepip, venv' 2>/dev/null; then
      sudo apt-get update -qq
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PYTHON $PYTHON-venv
    fi
    rm -rf $REMOTE_CODE && mkdir -p $REMOTE_CODE
    tar -xzf \$HOME/bits_jax.tar.gz -C $REMOTE_CODE
    [ -x $REMOTE_VENV/bin/python ] || $PYTHON -m venv $REMOTE_VENV
    $REMOTE_VENV/bin/pip install -q --upgrade pip
    $REMOTE_VENV/bin/pip install -q -e \"$REMOTE_CODE[tpu]\"
    $REMOTE_VENV/bin/python -c 'import bits_jax, jax; print(bits_jax.__version__, jax.__version__)'"
}

cmd_data() {
  need TPU ZONE DATA_DIR
  remote 0 "$REMOTE_VENV/bin/tfds build $(printf '%q' "$DATASET") --data_dir=$(printf '%q' \
    "$DATA_DIR")"
}

cmd_run() {
  need TPU ZONE WORKDIR DATA_DIR
  if [[ "$WORKDIR" != gs://* && "${SHARED_WORKDIR:-0}" != 1 ]]; then
    die "WORKDIR=$WORKDIR: every host must write the same workdir; use gs://BUCKET/... (or a" \
      "shared mount present on every host, with SHARED_WORKDIR=1)."
  fi
  cmd_data
  local train
  train="$REMOTE_VENV/bin/python -m bits_jax.main$(printf ' %q' "--config=$CONFIG" \
    "--workdir=$WORKDIR" "--config.input.data_dir=$DATA_DIR" "$@")"
  remote all "cd $REMOTE_CODE && $train 2>&1 | tee -a \$HOME/bits_jax_train.log"
}

cmd_ssh() {
  need TPU ZONE
  if (($#)); then
    remote all "$*"
  else
    set_tpu_args
    gcloud compute tpus tpu-vm ssh "${TPU_ARGS[@]}" --worker=0
  fi
}

cmd_delete() {
  need TPU ZONE
  set_tpu_args
  gcloud compute tpus tpu-vm delete "${TPU_ARGS[@]}" --quiet
}

main() {
  local command="${1:-}"
  case "$command" in
    create | setup | data | run | ssh | delete)
      shift
      "cmd_$command" "$@"
      ;;
    *) die "usage: scripts/run_tpu.sh create|setup|data|run|ssh|delete [ARGS] (see its top)." ;;
  esac
}

main "$@"
