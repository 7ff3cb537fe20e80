#!/usr/bin/env bash
# Train on this machine:  launch/train.sh CONFIG.yaml [section.key=value ...]
# Every recipe key, its default and meaning:  launch/train.sh --list-keys
#
# Runs torchrun with one process per visible GPU, or one process on a CPU-only machine.
# Environment:
#   NPROC                 processes to start (default: GPU count, or 1 without GPUs)
#   PYTHON                interpreter (default: python)
#   CUDA_DEVICE_MAX_CONNECTIONS  default 1 (Megatron's communication/computation overlap needs it)
#   NCCL_* / TORCH_NCCL_*  passed through unchanged (e.g. NCCL_DEBUG=INFO, NCCL_IB_HCA=...)
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit $([[ $# -lt 1 ]] && echo 2 || echo 0)
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
if [[ "$1" == "--list-keys" ]]; then
    exec "$PYTHON" -m megatron_nsa.training.train --list-keys
fi
if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi

export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# The run's closing note (a bad-input error, or where a SIGTERM-stopped run saved) is printed again
# after torchrun's own report, so that it is the last thing shown.
NOTE_FILE="$(mktemp)"
# Workers record their process ids here (megatron_nsa/training/stop.py); a stop creates the file `stop`.
STOP_DIR="$(mktemp -d)"
trap 'rm -rf "$NOTE_FILE" "$STOP_DIR"' EXIT
export MEGATRON_NSA_NOTE_FILE="$NOTE_FILE" MEGATRON_NSA_STOP_DIR="$STOP_DIR"

# torchrun neither handles nor receives SIGTERM / SIGINT (ignored, and left out of --signals-to-handle):
# a stop is the workers' own, so they save and exit normally and torchrun has nothing to report.
( trap '' TERM INT; exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    --signals-to-handle SIGHUP,SIGQUIT -m megatron_nsa.training.train "$@" ) &
child=$!
stop_workers() {
    touch "$STOP_DIR/stop"
    for worker in "$STOP_DIR"/[0-9]*; do
        [[ -e "$worker" ]] && kill -TERM "${worker##*/}" 2>/dev/null
    done
    return 0
}
# SIGTERM or Ctrl-C: every worker saves a checkpoint and stops.
trap stop_workers TERM INT
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
