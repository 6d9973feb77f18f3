#!/usr/bin/env bash
# TokMem over sequential rounds: each round learns TOOLS_PER_ROUND new tools as rows of the tool memory.
# Edit the variables below and run `bash run_n_rounds_main.sh`. The defaults are the embedded default (synthetic
# xLAM-format data, the tiny backbone built offline, CPU) and finish in minutes on 2 cores.
# For the paper-scale setting: MODEL=meta-llama/Llama-3.2-3B-Instruct DATA_SOURCE=xlam XLAM_PATH=/path/to/xlam.json
# NUM_ROUNDS=4 TOOLS_PER_ROUND=50 SAMPLES_PER_TOOL=50 TRAIN_SIZE=5000 TEST_SIZE=500 BATCH_SIZE=4 EPOCHS_PER_ROUND=1,3,3,3
set -euo pipefail
cd "$(dirname "$0")"

# ---- experiment -------------------------------------------------------------------------------------------------
NUM_ROUNDS=${NUM_ROUNDS:-3}
TOOLS_PER_ROUND=${TOOLS_PER_ROUND:-10}
START_TOOL=${START_TOOL:-1}
SAMPLES_PER_TOOL=${SAMPLES_PER_TOOL:-30}
EPOCHS_PER_ROUND=${EPOCHS_PER_ROUND:-3}          # one value, or one per round: 1,3,3
TRAIN_SIZE=${TRAIN_SIZE:-600}
TEST_SIZE=${TEST_SIZE:-60}
TRAIN_MAX_CALLS=${TRAIN_MAX_CALLS:-3}
TEST_MAX_CALLS=${TEST_MAX_CALLS:-3}
TRAIN_MAX_CALLS_PER_ROUND=${TRAIN_MAX_CALLS_PER_ROUND:-}   # e.g. 4,4,2 (overrides TRAIN_MAX_CALLS)
TEST_MAX_CALLS_PER_ROUND=${TEST_MAX_CALLS_PER_ROUND:-}
# ---- optimisation -----------------------------------------------------------------------------------------------
BATCH_SIZE=${BATCH_SIZE:-8}
LR=${LR:-1e-2}
LORA_LR=${LORA_LR:-5e-4}
CURRICULUM_LEARNING=${CURRICULUM_LEARNING:-false}
RENORM_ACTIVE_TOOLS=${RENORM_ACTIVE_TOOLS:-true}    # new rows scaled to the mean norm of the learned ones
DECOUPLE_EMBEDDINGS=${DECOUPLE_EMBEDDINGS:-false}  # true: separate input and output rows per tool
USE_LORA=${USE_LORA:-false}
FREEZE_LORA_AFTER_FIRST=${FREEZE_LORA_AFTER_FIRST:-false}
# ---- evaluation and output --------------------------------------------------------------------------------------
EVAL_ALL_PREVIOUS=${EVAL_ALL_PREVIOUS:-true}
SAVE_CHECKPOINTS=${SAVE_CHECKPOINTS:-false}
OUTPUT_DIR=${OUTPUT_DIR:-}                         # empty: runs/tokmem_<timestamp>
# ---- model, data, device ----------------------------------------------------------------------------------------
MODEL=${MODEL:-}                                   # empty: the embedded tiny backbone (built on first use)
DATA_SOURCE=${DATA_SOURCE:-synthetic}              # synthetic | xlam
XLAM_PATH=${XLAM_PATH:-}                           # local copy of xlam_function_calling_60k.json
DATA_DIR=${DATA_DIR:-data}
DEVICE=${DEVICE:-auto}
GPU=${GPU:-0}                                      # used only when CUDA_VISIBLE_DEVICES is not already set
SEED=${SEED:-42}

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$GPU}
PYTHON=${PYTHON:-python3}

source ./data_rounds.sh

# Step 1: each round's train/test/description files, generated unless present.
generate_round_data

# Step 2: the rounds.
args=(--training_rounds "$TRAINING_ROUNDS" --data_dir "$DATA_DIR" --batch_size "$BATCH_SIZE" --lr "$LR"
      --lora_lr "$LORA_LR" --device "$DEVICE" --seed "$SEED" --eval_after_each_round --demo 2
      --train_max_function_calls "$TRAIN_MAX_CALLS" --test_max_function_calls "$TEST_MAX_CALLS")
[[ -n "$MODEL" ]] && args+=(--model_name "$MODEL")
[[ -n "$TRAIN_MAX_CALLS_PER_ROUND" ]] && args+=(--train_max_function_calls_per_round "$TRAIN_CALLS_LIST")
[[ -n "$TEST_MAX_CALLS_PER_ROUND" ]] && args+=(--test_max_function_calls_per_round "$TEST_CALLS_LIST")
[[ -n "$OUTPUT_DIR" ]] && args+=(--output_dir "$OUTPUT_DIR")
[[ "$EVAL_ALL_PREVIOUS" == true ]] && args+=(--eval_all_previous)
[[ "$CURRICULUM_LEARNING" == true ]] && args+=(--curriculum_learning)
[[ "$RENORM_ACTIVE_TOOLS" == true ]] && args+=(--renorm_active_tools)
[[ "$DECOUPLE_EMBEDDINGS" == true ]] && args+=(--decouple_embeddings)
[[ "$USE_LORA" == true ]] && args+=(--use_lora)
[[ "$FREEZE_LORA_AFTER_FIRST" == true ]] && args+=(--freeze_lora_after_first)
[[ "$SAVE_CHECKPOINTS" == true ]] && args+=(--save_checkpoints)

echo "Running TokMem rounds $TRAINING_ROUNDS"
"$PYTHON" main_sequential.py "${args[@]}" "$@"
