#!/bin/bash
# The GPU table of benchmarks/train_step.py (bf16, MFU), as run on a lent device machine:
#
#   bash benchmarks/gpu_table.sh [OUT_DIR]
#
# The machine's own python3 (jax, flax, optax, torch) runs it; ml_collections, which it lacks,
# comes as a wheel in .whl/ (see benchmarks/README.md). Rows run in order of interest and each
# one is written to OUT_DIR/table.json when done, so a run cut short keeps what it measured.
# Environment: ROWS, COMPILE_ROWS, TABLE_SECONDS, MEM_FRACTION (jax's share of the GPU memory,
# 0.5 while torch shares it), TABLE_NAME (output file stem), and ARGS (more train_step.py
# flags, e.g. "--attention=cudnn --no-torch").
set -u
out=${1:-${OUT:-/tmp/gpu_table}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# jax and torch share the GPU in one process: neither takes the whole memory up front.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.5}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
timeout "${TABLE_SECONDS:-420}" python3 benchmarks/train_step.py \
  --rows="${ROWS:-vit_base_224_b64,vit_small_224_b64,vit_base_224_b256,vit_small_224_b256,vit_tiny_32_b256,vit_tiny_32_b64}" \
  --compile_rows="${COMPILE_ROWS:-vit_base_224_b64,vit_small_224_b64}" \
  --rounds=5 --steps=10 --json_out="$out/${TABLE_NAME:-table}.json" ${ARGS:-} 2>&1 |
  tee "$out/${TABLE_NAME:-table}.log"
