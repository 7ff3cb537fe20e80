# Sourced by launch/megatron_lm_pretrain.sh and launch/megatron_lm_pretrain.sbatch: checks MEGATRON_LM, sets
# PYTHONPATH and the environment, and turns "FILE.args ... --flags" ($@) into MEGATRON_LM_FLAGS (an array).
PYTHON="${PYTHON:-python}"
if [[ -z "${MEGATRON_LM:-}" || ! -f "${MEGATRON_LM}/pretrain_gpt.py" ]]; then
    echo "MEGATRON_LM must name a Megatron-LM clone (its root, holding pretrain_gpt.py); get one with" >&2
    echo "  git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM.git" >&2
    exit 2
fi
export PYTHONPATH="${MEGATRON_LM}:${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

MEGATRON_LM_FLAGS=()
while [[ $# -gt 0 && "$1" == *.args ]]; do
    [[ -f "$1" ]] || { echo "no such flags file: $1" >&2; exit 2; }
    read -ra words <<< "$(sed 's/#.*//' "$1" | tr '\n' ' ')"
    MEGATRON_LM_FLAGS+=("${words[@]}")
    shift
done
CKPT_DIR="${CKPT_DIR:-checkpoints/megatron_lm}"
MEGATRON_LM_FLAGS+=(--save "$CKPT_DIR" --load "$CKPT_DIR")
if [[ -n "${DATA_PATH:-}" ]]; then
    [[ -n "${TOKENIZER:-}" ]] || { echo "DATA_PATH needs TOKENIZER (a Hugging Face tokenizer)" >&2; exit 2; }
    read -ra data_paths <<< "$DATA_PATH"
    MEGATRON_LM_FLAGS+=(--data-path "${data_paths[@]}" --tokenizer-type HuggingFaceTokenizer
                        --tokenizer-model "$TOKENIZER" --split 990,9,1)
else
    echo "DATA_PATH is not set: training on Megatron-LM's mock data" >&2
    MEGATRON_LM_FLAGS+=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000)
fi
MEGATRON_LM_FLAGS+=("$@")
