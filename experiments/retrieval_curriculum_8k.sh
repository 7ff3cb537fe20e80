#!/usr/bin/env bash
# The retrieval length curriculum 256 -> 1k -> 4k -> 8k of configs/retrieval_curriculum_8k.yaml, then the
# needle test at 8k, 16k and 32k. Each stage resumes the previous stage's checkpoint with a new
# data.seq_length, batch (65,536 tokens per step throughout) and facts_per_sequence; training.train_steps
# counts from the start of the curriculum, so a finished stage is a no-op when the script runs again.
#
#   bash experiments/retrieval_curriculum_8k.sh nsa|dense [SECONDS]
#
# SECONDS (default: no limit) bounds the training of this call: the stage running when it is up gets
# SIGTERM, saves its checkpoint and stops, and running the same command again resumes it. So the
# curriculum runs in jobs of any length, e.g. `... nsa 540` in each 10-minute job, as long as
# checkpoints/retrieval_curriculum_8k[_dense] is kept (or copied) from one job to the next. Run from the
# repository root. The needle test runs once the last stage has finished; its results go to
# checkpoints/retrieval_curriculum_8k[_dense]/needle.{json,md,png}.
set -euo pipefail

model=${1:-}
limit_s=${2:-0}
case "$model" in
  nsa) dir=checkpoints/retrieval_curriculum_8k ;;
  dense) dir=checkpoints/retrieval_curriculum_8k_dense ;;
  *) echo "usage: $0 nsa|dense [SECONDS]: the first argument must be nsa or dense, got '${model}'" >&2; exit 2 ;;
esac
if ! [[ "$limit_s" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 nsa|dense [SECONDS]: SECONDS must be a whole number of seconds (0: no limit), got '${limit_s}'" >&2
  exit 2
fi

# length:sequences per step:facts per sequence:last step of the stage
stages=(256:256:8:600 1024:64:32:1000 4096:16:128:1400 8192:8:512:3000)
start=$(date +%s)
for stage in "${stages[@]}"; do
  IFS=: read -r length sequences facts last_step <<<"$stage"
  limit=()
  if ((limit_s > 0)); then
    left=$((limit_s - ($(date +%s) - start)))
    if ((left < 60)); then
      echo "time limit reached before the ${length}-token stage: run the same command again to continue"
      exit 0
    fi
    limit=(timeout -s TERM "$left")
  fi
  echo "stage: ${length} tokens x ${sequences} sequences, ${facts} facts per sequence, up to step ${last_step}"
  status=0
  "${limit[@]}" launch/train.sh configs/retrieval_curriculum_8k.yaml "model.attention=${model}" \
    "checkpoint.dir=${dir}" "logging.metrics_file=${dir}/metrics.jsonl" "data.seq_length=${length}" \
    "training.micro_batch_size=${sequences}" "training.global_batch_size=${sequences}" \
    "retrieval.facts_per_sequence=${facts}" "training.train_steps=${last_step}" || status=$?
  if ((status == 124)); then
    echo "time limit reached in the ${length}-token stage (checkpoint saved): run the same command again to resume"
    exit 0
  elif ((status != 0)); then
    exit "$status"
  fi
done
python -m megatron_nsa.eval.needle --checkpoint "$dir" --lengths 8192 16384 32768 \
  --depths 0 10 20 30 40 50 60 70 80 90 100 --samples 20 --format retrieval \
  $([[ "$model" == nsa ]] && echo --selections) \
  --json "${dir}/needle.json" --table "${dir}/needle.md" --png "${dir}/needle.png"
