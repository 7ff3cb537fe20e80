#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt with NSA attention on this machine (one node):
#   launch/megatron_lm_pretrain.sh FLAGS.args [MORE.args ...] [--any-megatron-lm-or-nsa-flag ...]
# e.g.  launch/megatron_lm_pretrain.sh configs/megatron_lm/nsa_1b_64k.args
#       launch/megatron_lm_pretrain.sh configs/megatron_lm/nsa_1b_64k.args configs/megatron_lm/paper_attention.args
# .args files hold flags ('#' starts a comment); later flags win over earlier ones.
# Environment:
#   MEGATRON_LM   root of a Megatron-LM clone at a release tag (required; e.g. core_v0.19.0)
#   CKPT_DIR      checkpoint folder, saved to and resumed from (default checkpoints/megatron_lm)
#   DATA_PATH     Megatron-LM indexed dataset prefix(es); unset: Megatron-LM's mock data
#   TOKENIZER     Hugging Face tokenizer (name or folder) for DATA_PATH
#   NPROC         processes (default: the GPU count);  PYTHON  interpreter (default: python)
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit $([[ $# -lt 1 ]] && echo 2 || echo 0)
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/megatron_lm_common.sh"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"

cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_nsa.megatron_lm.pretrain_gpt "${MEGATRON_LM_FLAGS[@]}"
