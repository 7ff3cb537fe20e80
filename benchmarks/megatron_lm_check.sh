#!/usr/bin/env bash
# Runs benchmarks/megatron_lm_check.py on a GPU machine that has Python, PyTorch and Triton but no
# megatron-core, from the repository root:
#   .megatron-lm/  Megatron-LM at core_v0.19.0 (its megatron/, pretrain_gpt.py, gpt_builders.py,
#                  model_provider.py; git-ignored, never committed)
#   .whl/          the megatron-core wheel of the same release (its dataset helpers come compiled)
# Results and logs go to $OUT (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/megatron_lm_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
ln -sfn "$PWD/kernels" "$SITE/nsa_kernels"  # kernels/ is imported as nsa_kernels (setup.py)

# Megatron-LM builds its dataset helpers with `make` at start-up (the Makefile beside them); the
# wheel's compiled helpers are put under every name that Makefile can target, so nothing is built.
HELPERS=.megatron-lm/megatron/core/datasets
for name in "helpers_cpp$(python3-config --extension-suffix 2>/dev/null || true)" \
            helpers_cpp.cpython-312-x86_64-linux-gnu.so helpers_cpp; do
  cp "$SITE"/megatron/core/datasets/helpers_cpp*.so "$HELPERS/$name"
done
if ! command -v make >/dev/null; then  # no make here: the helpers are in place, so a no-op one will do
  mkdir -p /tmp/megatron_lm_bin && printf '#!/bin/sh\nexit 0\n' >/tmp/megatron_lm_bin/make
  chmod +x /tmp/megatron_lm_bin/make && export PATH=/tmp/megatron_lm_bin:$PATH
fi

export PYTHONPATH="$PWD/.megatron-lm:$PWD:$SITE" PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 \
       NCCL_NVLS_ENABLE=0 TRITON_CACHE_DIR=/tmp/megatron_lm_triton
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
exec python3 -m benchmarks.megatron_lm_check --out "${OUT:-benchmarks/results}" "$@"
