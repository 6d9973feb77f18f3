#!/usr/bin/env bash
# The LoRA baseline over sequential rounds: a LoRA adapter learns each round's tools as text markers ([tool_N]),
# optionally re-initialised each round and optionally with replay of earlier rounds' samples.
# Edit the variables below (the rounds' data: data_rounds.sh) and run `bash run_n_rounds_lora.sh`. The defaults are
# the embedded default (synthetic xLAM-format data, the tiny backbone built offline, CPU), the same rounds and data as
# run_n_rounds_main.sh, and finish in minutes on 2 cores. Compare with TokMem afterwards: python compare_runs.py
# runs/tokmem_* runs/lora_*
# For the paper-scale setting: MODEL=meta-llama/Llama-3.2-3B-Instruct DATA_SOURCE=xlam XLAM_PATH=/path/to/xlam.json
# NUM_ROUNDS=4 TOOLS_PER_ROUND=50 SAMPLES_PER_TOOL=50 TRAIN_SIZE=5000 TEST_SIZE=500 BATCH_SIZE=4 EPOCHS_PER_ROUND=1,3,3,3
# PRESET=paper: the original toolkit's LoRA-baseline settings; any variable set in the environment wins over it.
# DRY_RUN=true prints the commands and runs nothing.
set -euo pipefail
source "$(dirname "$0")/presets.sh"
start_script lora "$0" "$@"   # cd here; --help; PRESET; the rounds' data variables (data_rounds.sh)

# ---- experiment (keep equal to run_n_rounds_main.sh to compare) -------------------------------------------------
NUM_ROUNDS=${NUM_ROUNDS:-3}
TOOLS_PER_ROUND=${TOOLS_PER_ROUND:-10}
START_TOOL=${START_TOOL:-1}
EPOCHS_PER_ROUND=${EPOCHS_PER_ROUND:-3}          # one value, or one per round: 1,3,3 (a short list repeats its last)
# ---- optimisation -----------------------------------------------------------------------------------------------
BATCH_SIZE=${BATCH_SIZE:-8}
LR=${LR:-}                                         # LoRA learning rate; empty: 3e-3 on the tiny backbone, else 5e-4
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-32}
LORA_DROPOUT=${LORA_DROPOUT:-0.1}
MAX_GRAD_NORM=${MAX_GRAD_NORM:-1.0}                # 0: no clipping (the original)
MAX_LENGTH=${MAX_LENGTH:-512}
LORA_TARGET_MODULES=${LORA_TARGET_MODULES:-}       # empty: every linear layer on the tiny backbone, else attention
MARKER_STYLE=${MARKER_STYLE:-number}               # number: [tool_7] | name: [tool: get_weather]
REINIT_LORA=${REINIT_LORA:-false}                  # true: a fresh adapter at the start of every round after the first
USE_REPLAY_BUFFER=${USE_REPLAY_BUFFER:-false}
REPLAY_BUFFER_SIZE=${REPLAY_BUFFER_SIZE:-1000}     # reservoir capacity (samples)
REPLAY_RATIO=${REPLAY_RATIO:-0.2}                  # share of every training batch replayed (rounds after the first)
REPLAY_POLICY=${REPLAY_POLICY:-reservoir}          # reservoir | original (min(n/2, 500) per round, displacing rows)
# ---- prompt, evaluation and output ------------------------------------------------------------------------------
PROMPT_FORMAT=${PROMPT_FORMAT:-chat}               # chat (fixed date) | original (hand-written Llama-3 turns)
EVAL_ALL_PREVIOUS=${EVAL_ALL_PREVIOUS:-true}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-16}
SAVE_CHECKPOINTS=${SAVE_CHECKPOINTS:-false}
VALIDATION_SPLIT=${VALIDATION_SPLIT:-0}                # share of each round's training samples held out and scored
OUTPUT_DIR=${OUTPUT_DIR:-}                         # empty: runs/lora_<timestamp> or runs/lora_replay_<timestamp>
# ---- model, device, processes, SEED: data_rounds.sh, shared by the three scripts --------------------------------
SEEDS=${SEEDS:-}                                    # 42,1,2: one run per seed in turn, into OUTPUT_DIR/seed_S

int_var NUM_ROUNDS TOOLS_PER_ROUND START_TOOL BATCH_SIZE EVAL_BATCH_SIZE MAX_LENGTH LORA_R LORA_ALPHA REPLAY_BUFFER_SIZE
seeds_var
number_var MAX_GRAD_NORM LORA_DROPOUT REPLAY_RATIO VALIDATION_SPLIT
[[ -z "$LR" ]] || number_var LR
bool_var REINIT_LORA USE_REPLAY_BUFFER EVAL_ALL_PREVIOUS SAVE_CHECKPOINTS
# The tiny backbone (1.6M parameters) learns the markers in a few hundred steps only with a larger rate and adapters on
# its MLPs too (round 1 tool F1: attention-only at 5e-4 0.000, every linear layer at 3e-3 0.901); a real LLM keeps the
# usual LoRA settings.
if [[ -z "$MODEL" ]]; then
    LR=${LR:-3e-3}
    LORA_TARGET_MODULES=${LORA_TARGET_MODULES:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
else
    LR=${LR:-5e-4}
    LORA_TARGET_MODULES=${LORA_TARGET_MODULES:-q_proj,k_proj,v_proj,o_proj}
fi
PYTHON=${PYTHON:-python3}


plan_round_data   # the rounds' specs and call caps (data_rounds.sh); nothing runs yet

# The rounds' command.
args=(--training_rounds "$TRAINING_ROUNDS" --data_dir "$DATA_DIR" --batch_size "$BATCH_SIZE" --lr "$LR"
      --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT"
      --lora_target_modules "$LORA_TARGET_MODULES" --marker_style "$MARKER_STYLE" --max_grad_norm "$MAX_GRAD_NORM"
      --max_length "$MAX_LENGTH" --prompt_format "$PROMPT_FORMAT" --device "$DEVICE" --dtype "$DTYPE" --seed "$SEED"
      --eval_after_each_round --eval_batch_size "$EVAL_BATCH_SIZE" --demo 2
      --train_max_function_calls_per_round "$TRAIN_CALLS_LIST" --test_max_function_calls_per_round "$TEST_CALLS_LIST")
[[ -n "$MODEL" ]] && args+=(--model_name "$MODEL")
args+=(--validation_split "$VALIDATION_SPLIT")
[[ -n "$OUTPUT_DIR" ]] && args+=(--output_dir "$OUTPUT_DIR")
[[ "$EVAL_ALL_PREVIOUS" == true ]] && args+=(--eval_all_previous)
[[ "$REINIT_LORA" == true ]] && args+=(--reinit_lora_after_each_round)
[[ "$USE_REPLAY_BUFFER" == true ]] && args+=(--use_replay_buffer --replay_buffer_size "$REPLAY_BUFFER_SIZE"
                                             --replay_ratio "$REPLAY_RATIO" --replay_policy "$REPLAY_POLICY")
[[ "$SAVE_CHECKPOINTS" == true ]] && args+=(--save_checkpoints)
[[ "$SHARD_BACKBONE" == true ]] && args+=(--shard_backbone)

# Step 1: check what needs no data (flags, output place, backbone), then each round's files.
preflight lora_sequential.py "${args[@]}" "$@"
# Each round's train/test/description files (the same files TokMem uses; made again when their settings changed).
generate_round_data

# Step 2: the rounds.
[[ "${DRY_RUN:-false}" == true ]] ||
    echo "Running the LoRA baseline, rounds $TRAINING_ROUNDS (replay: $USE_REPLAY_BUFFER, reinit: $REINIT_LORA)"
python_cli lora_sequential.py
run_seeds "$([[ $USE_REPLAY_BUFFER == true ]] && echo lora_replay || echo lora)" "${args[@]}" "$@"
