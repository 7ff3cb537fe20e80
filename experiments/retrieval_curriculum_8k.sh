#!/usr/bin/env bash
# The retrieval length curriculum 256 -> 1k -> 4k -> 8k of configs/retrieval_curriculum_8k.yaml, then the
# needle test at the last stage's length and at 2x and 4x it. Each stage resumes the previous stage's
# checkpoint with a new data.seq_length, batch and facts_per_sequence; training.train_steps counts from
# the start of the curriculum, and a stage whose last step the checkpoint directory already holds is
# skipped when the script runs again (no trainer starts for it). After each stage the
# recall breakdown (experiments/recall_breakdown.py) of its last checkpoint goes to
# CHECKPOINT_DIR/recall_step_STEP.json, and the end prints them as one table: recall against length and steps.
#
#   bash experiments/retrieval_curriculum_8k.sh nsa|dense [SECONDS] [section.key=value ...]
#
# SECONDS (default 0: no limit) bounds the training of this call: the stage running when it is up gets
# SIGTERM, saves its checkpoint and stops, and running the same command again resumes it. So the
# curriculum runs in jobs of any length, e.g. `... nsa 540` in each 10-minute job, as long as the
# checkpoint directory is kept (or copied) from one job to the next. Overrides after SECONDS go to every
# stage (after the stage's own, so they win), e.g. `optimizer.lr=3e-3 retrieval.single_facts=16
# checkpoint.dir=checkpoints/curriculum_lr3e-3`; give each variant its own checkpoint.dir.
# Environment:
#   CURRICULUM_STAGES  the stages, "length:sequences:facts:last_step[,section.key=value...] ..." (default:
#                      the four below); with other step counts set optimizer.decay_steps to the last stage's
#                      last step. Overrides after a stage's numbers apply to that stage alone (before the
#                      command line's), e.g. "8192:8:64:6000,retrieval.mean_gap=14" (the needle test then
#                      takes the last stage's settings, saved with its checkpoint)
#   NEEDLE_SAMPLES     samples per needle cell (default 20)
#   RECALL_SAMPLES     validation sequences of each stage's recall breakdown (default 16; 0: none)
#   NEEDLE_SILENCE     NSA: branches to turn off in a second needle test at the last stage's length, e.g.
#                      "cmp win" (the selected branch alone; megatron_nsa.eval.needle --silence), written to
#                      CHECKPOINT_DIR/needle_silenced.{json,md} (default: none)
#   NEEDLE_RANKS       NSA: 1 adds the needle block's rank by selection score at the last stage's length
#                      (megatron_nsa.eval.needle --ranks, on the torch backend: the reference's block scores),
#                      written to CHECKPOINT_DIR/needle_ranks.{json,md} (default: 0)
#   CURRICULUM_RECIPE  the recipe every stage trains (default configs/retrieval_curriculum_8k.yaml); a
#                      recipe with learned positions cannot change length: give it RoPE
#                      (model.position_embedding_type=rope)
# Run from the repository root. The needle results go to CHECKPOINT_DIR/needle.{json,md,png}
# (default checkpoint directory: checkpoints/retrieval_curriculum_8k[_dense]), the last checkpoint's weights
# in bf16 to CHECKPOINT_DIR/weights/step_XXXXXXXX (megatron_nsa.eval.export: every evaluation command loads
# CHECKPOINT_DIR/weights, on CPU too).
set -euo pipefail

usage="usage: $0 nsa|dense [SECONDS] [section.key=value ...]"
model=${1:-}
limit_s=${2:-0}
extra=("${@:3}")
case "$model" in
  nsa) dir=checkpoints/retrieval_curriculum_8k ;;
  dense) dir=checkpoints/retrieval_curriculum_8k_dense ;;
  *) echo "${usage}: the first argument must be nsa or dense, got '${model}'" >&2; exit 2 ;;
esac
if ! [[ "$limit_s" =~ ^[0-9]+$ ]]; then
  echo "${usage}: SECONDS must be a whole number of seconds (0: no limit), got '${limit_s}'" >&2
  exit 2
fi
for override in "${extra[@]}"; do
  if [[ "$override" != *.*=* ]]; then
    echo "${usage}: override '${override}' must look like section.key=value" >&2
    exit 2
  fi
  if [[ "$override" == checkpoint.dir=* ]]; then
    dir=${override#checkpoint.dir=}
  fi
done

# length:sequences per step:facts per sequence:last step of the stage
read -r -a stages <<<"${CURRICULUM_STAGES:-256:256:8:600 1024:64:32:1000 4096:16:128:1400 8192:8:512:3000}"
previous=0
for stage in "${stages[@]}"; do
  IFS=, read -r -a parts <<<"$stage"  # the stage's numbers, then its own overrides
  if ! [[ "${parts[0]}" =~ ^[0-9]+:[0-9]+:[0-9]+:[0-9]+$ ]]; then
    echo "CURRICULUM_STAGES: stage '${stage}' must be length:sequences:facts:last_step (whole numbers), then" \
      "optionally ,section.key=value overrides" >&2
    exit 2
  fi
  for override in "${parts[@]:1}"; do
    if [[ "$override" != *.*=* ]]; then
      echo "CURRICULUM_STAGES: stage '${stage}': override '${override}' must look like section.key=value" >&2
      exit 2
    fi
  done
  last=${parts[0]##*:}
  if ((last <= previous)); then
    echo "CURRICULUM_STAGES: stage '${stage}' ends at step ${last}, not after the previous stage's ${previous}" >&2
    exit 2
  fi
  previous=$last
done
recipe=${CURRICULUM_RECIPE:-configs/retrieval_curriculum_8k.yaml}
if [[ ! -f "$recipe" ]]; then
  echo "CURRICULUM_RECIPE: no recipe file '${recipe}'" >&2
  exit 2
fi
needle_samples=${NEEDLE_SAMPLES:-20}
for branch in ${NEEDLE_SILENCE:-}; do
  if [[ "$branch" != cmp && "$branch" != slc && "$branch" != win ]]; then
    echo "NEEDLE_SILENCE: '${branch}' is not a branch: give some of cmp slc win, e.g. NEEDLE_SILENCE=\"cmp win\"" >&2
    exit 2
  fi
done
needle_ranks=${NEEDLE_RANKS:-0}
if [[ "$needle_ranks" != 0 && "$needle_ranks" != 1 ]]; then
  echo "NEEDLE_RANKS must be 0 or 1, got '${needle_ranks}'" >&2
  exit 2
fi
if ! [[ "$needle_samples" =~ ^[1-9][0-9]*$ ]]; then
  echo "NEEDLE_SAMPLES must be a whole number >= 1, got '${needle_samples}'" >&2
  exit 2
fi
recall_samples=${RECALL_SAMPLES:-16}
if ! [[ "$recall_samples" =~ ^[0-9]+$ ]]; then
  echo "RECALL_SAMPLES must be a whole number >= 0, got '${recall_samples}'" >&2
  exit 2
fi
# The step of the newest complete checkpoint in the run's directory (0: none yet).
latest_step() {
  local latest=0 name step
  for name in "$dir"/step_*; do
    step=${name##*/step_}
    if [[ -d "$name" && "$step" =~ ^[0-9]+$ ]] && ((10#$step > latest)); then
      latest=$((10#$step))
    fi
  done
  echo "$latest"
}

# The recall breakdown of a finished stage's checkpoint, unless made already (or the checkpoint is gone).
stage_recall() {
  if ((recall_samples > 0)) && [[ ! -e "$recall" && -d "$stage_checkpoint" ]]; then
    "${PYTHON:-python}" -m experiments.recall_breakdown --checkpoint "$stage_checkpoint" \
      --samples "$recall_samples" --json "$recall"
  fi
}

start=$(date +%s)
for stage in "${stages[@]}"; do
  IFS=, read -r -a parts <<<"$stage"
  IFS=: read -r length sequences facts last_step <<<"${parts[0]}"
  stage_overrides=("${parts[@]:1}")
  recall="${dir}/recall_step_${last_step}.json"
  stage_checkpoint="${dir}/step_$(printf %08d "$last_step")"
  if (($(latest_step) >= last_step)); then
    # trained by an earlier run of this command: no trainer start (it would only resume and stop)
    echo "stage: ${length} tokens, up to step ${last_step}: trained already"
    stage_recall
    continue
  fi
  limit=()
  if ((limit_s > 0)); then
    left=$((limit_s - ($(date +%s) - start)))
    if ((left < 60)); then
      echo "time limit reached before the ${length}-token stage: run the same command again to continue"
      exit 0
    fi
    limit=(timeout -s TERM "$left")
  fi
  echo "stage: ${length} tokens x ${sequences} sequences, ${facts} facts per sequence, up to step ${last_step}" \
    "${stage_overrides[*]}"
  status=0
  "${limit[@]}" launch/train.sh "$recipe" "model.attention=${model}" \
    "checkpoint.dir=${dir}" "logging.metrics_file=${dir}/metrics.jsonl" "data.seq_length=${length}" \
    "training.micro_batch_size=${sequences}" "training.global_batch_size=${sequences}" \
    "retrieval.facts_per_sequence=${facts}" "training.train_steps=${last_step}" "${stage_overrides[@]}" \
    "${extra[@]}" || status=$?
  if ((status == 124)); then
    echo "time limit reached in the ${length}-token stage (checkpoint saved): run the same command again to resume"
    exit 0
  elif ((status != 0)); then
    exit "$status"
  fi
  stage_recall
done
if ((recall_samples > 0)); then
  "${PYTHON:-python}" -m experiments.recall_breakdown --curve "$dir" --table "${dir}/recall_curve.md"
fi
depths=(0 10 20 30 40 50 60 70 80 90 100)
"${PYTHON:-python}" -m megatron_nsa.eval.needle --checkpoint "$dir" --lengths "$length" $((2 * length)) $((4 * length)) \
  --depths "${depths[@]}" --samples "$needle_samples" --format retrieval \
  $([[ "$model" == nsa ]] && echo --selections) \
  --json "${dir}/needle.json" --table "${dir}/needle.md" --png "${dir}/needle.png"
if [[ -n "${NEEDLE_SILENCE:-}" && "$model" == nsa ]]; then
  # shellcheck disable=SC2086  # one argument per branch
  "${PYTHON:-python}" -m megatron_nsa.eval.needle --checkpoint "$dir" --lengths "$length" \
    --depths "${depths[@]}" --samples "$needle_samples" --format retrieval --silence $NEEDLE_SILENCE \
    --json "${dir}/needle_silenced.json" --table "${dir}/needle_silenced.md"
fi
if [[ "$needle_ranks" == 1 && "$model" == nsa ]]; then
  "${PYTHON:-python}" -m megatron_nsa.eval.needle --checkpoint "$dir" --lengths "$length" \
    --depths "${depths[@]}" --samples "$needle_samples" --format retrieval --selections --ranks nsa.backend=torch \
    --json "${dir}/needle_ranks.json" --table "${dir}/needle_ranks.md"
fi
# The trained model's weights alone (bf16, a few MB), for evaluation on any machine: the step_* checkpoints
# hold the optimizer too and are too large to copy off a GPU job.
if [[ ! -d "${dir}/weights/step_$(printf %08d "$last_step")" ]]; then
  "${PYTHON:-python}" -m megatron_nsa.eval.export --checkpoint "$dir" --out "${dir}/weights" --dtype bf16
fi
