#!/usr/bin/env bash
# Train on this machine:  launch/train.sh CONFIG.yaml [section.key=value ...]
#
# Runs torchrun with one process per visible GPU, or one process on a CPU-only machine.
# Environment:
#   NPROC                 processes to start (default: GPU count, or 1 without GPUs)
#   PYTHON                interpreter (default: python)
#   CUDA_DEVICE_MAX_CONNECTIONS  default 1 (Megatron's communication/computation overlap needs it)
#   NCCL_* / TORCH_NCCL_*  passed through unchanged (e.g. NCCL_DEBUG=INFO, NCCL_IB_HCA=...)
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit $([[ $# -lt 1 ]] && echo 2 || echo 0)
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi

export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

# The run's closing note (a bad-input error, or where a SIGTERM-stopped run saved) is printed again
# after torchrun's own report, so that it is the last thing shown.
NOTE_FILE="$(mktemp)"
trap 'rm -f "$NOTE_FILE"' EXIT
export MEGATRON_NSA_NOTE_FILE="$NOTE_FILE"

"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_nsa.training.train "$@" &
child=$!
# SIGTERM or Ctrl-C: torchrun forwards SIGTERM to the workers, which save a checkpoint and stop.
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
status=0
while true; do
    wait "$child" && { status=0; break; } || status=$?
    kill -0 "$child" 2>/dev/null || break
done
if [[ -s "$NOTE_FILE" ]]; then
    echo >&2
    cat "$NOTE_FILE" >&2
    grep -q '^error: ' "$NOTE_FILE" && exit 2
    exit 0
fi
exit "$status"
