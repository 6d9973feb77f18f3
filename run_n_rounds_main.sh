#!/usr/bin/env bash
# TokMem over sequential rounds: each round learns TOOLS_PER_ROUND new tools as rows of the tool memory.
# Edit the variables below (the rounds' data: data_rounds.sh) and run `bash run_n_rounds_main.sh`. The defaults are
# the embedded default (synthetic xLAM-format data, the tiny backbone built offline, CPU) and finish in minutes on 2
# cores.
# PRESET=paper: the original toolkit's settings and behaviour (Llama-3.2-3B-Instruct, the real xLAM file, 2 x 50
# tools); any variable set in the environment wins over the preset. DRY_RUN=true prints the commands and runs nothing.
set -euo pipefail
source "$(dirname "$0")/presets.sh"
start_script main "$0" "$@"   # cd here; --help; PRESET; the rounds' data variables (data_rounds.sh)

# ---- experiment -------------------------------------------------------------------------------------------------
NUM_ROUNDS=${NUM_ROUNDS:-3}
TOOLS_PER_ROUND=${TOOLS_PER_ROUND:-10}
START_TOOL=${START_TOOL:-1}
EPOCHS_PER_ROUND=${EPOCHS_PER_ROUND:-3}                # one value, or one per round: 1,3,3 (a short list repeats its last)
# ---- optimisation -----------------------------------------------------------------------------------------------
BATCH_SIZE=${BATCH_SIZE:-8}
LR=${LR:-1e-2}
LORA_LR=${LORA_LR:-5e-4}
MAX_GRAD_NORM=${MAX_GRAD_NORM:-1.0}                    # 0: no clipping (the original)
MAX_LENGTH=${MAX_LENGTH:-512}
CURRICULUM_LEARNING=${CURRICULUM_LEARNING:-false}
RENORM_ACTIVE_TOOLS=${RENORM_ACTIVE_TOOLS:-true}       # new rows scaled to the mean norm of the learned ones
RENORM_ROWS=${RENORM_ROWS:-all}                        # all | output (the original)
RENORM_FROM_ROUND=${RENORM_FROM_ROUND:-1}              # the original renormalises from round 3 on
TOOL_INIT_NORM=${TOOL_INIT_NORM:-embedding}            # embedding | unit (the original)
PROTOTYPE_WEIGHT=${PROTOTYPE_WEIGHT:-0}                # extension, not in the paper: 1 keeps earlier tools' query prototypes
MEMORY_DTYPE=${MEMORY_DTYPE:-float32}                  # float32 | model (the backbone's dtype, the original)
DECOUPLE_EMBEDDINGS=${DECOUPLE_EMBEDDINGS:-false}      # true: separate input and output rows per tool
USE_LORA=${USE_LORA:-false}
FREEZE_LORA_AFTER_FIRST=${FREEZE_LORA_AFTER_FIRST:-false}
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-32}
LORA_DROPOUT=${LORA_DROPOUT:-0.1}
LORA_TARGET_MODULES=${LORA_TARGET_MODULES:-q_proj,k_proj,v_proj,o_proj}
# ---- prompt, decoding, evaluation and output --------------------------------------------------------------------
PROMPT_FORMAT=${PROMPT_FORMAT:-chat}                   # chat (fixed date) | original (hand-written Llama-3 turns)
OFFER_ALL_TOOLS=${OFFER_ALL_TOOLS:-false}              # true: untrained later rows may be emitted (the original)
UNCONSTRAINED_DECODING=${UNCONSTRAINED_DECODING:-false}  # true: tool tokens also inside a call (the original)
USE_GROUND_TRUTH_TOOLS=${USE_GROUND_TRUTH_TOOLS:-false}  # also score with the gold tools at the tool positions
GROUND_TRUTH_STYLE=${GROUND_TRUTH_STYLE:-forced}       # forced | replace (the original)
STOP_TOKENS=${STOP_TOKENS:-eot}                        # eot | generation_config (also <|end_of_text|>, the original)
QUERY_CUT=${QUERY_CUT:-head}                           # head: long queries lose their head | none (the original)
EVAL_ALL_PREVIOUS=${EVAL_ALL_PREVIOUS:-true}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-16}
SAVE_CHECKPOINTS=${SAVE_CHECKPOINTS:-false}
VALIDATION_SPLIT=${VALIDATION_SPLIT:-0}                # share of each round's training samples held out and scored
OUTPUT_DIR=${OUTPUT_DIR:-}                             # empty: runs/tokmem_<timestamp>
# ---- model, device, processes, SEED: data_rounds.sh, shared by the three scripts --------------------------------
SEEDS=${SEEDS:-}                                        # 42,1,2: one run per seed in turn, into OUTPUT_DIR/seed_S
RNG=${RNG:-toolkit}                                    # toolkit: draws seeded per round | original: the original's order

int_var NUM_ROUNDS TOOLS_PER_ROUND START_TOOL BATCH_SIZE EVAL_BATCH_SIZE MAX_LENGTH RENORM_FROM_ROUND LORA_R LORA_ALPHA
seeds_var
number_var LR LORA_LR MAX_GRAD_NORM PROTOTYPE_WEIGHT LORA_DROPOUT VALIDATION_SPLIT
bool_var CURRICULUM_LEARNING RENORM_ACTIVE_TOOLS DECOUPLE_EMBEDDINGS USE_LORA FREEZE_LORA_AFTER_FIRST OFFER_ALL_TOOLS \
    UNCONSTRAINED_DECODING USE_GROUND_TRUTH_TOOLS EVAL_ALL_PREVIOUS SAVE_CHECKPOINTS
PYTHON=${PYTHON:-python3}


plan_round_data   # the rounds' specs and call caps (data_rounds.sh); nothing runs yet

# The rounds' command.
args=(--training_rounds "$TRAINING_ROUNDS" --data_dir "$DATA_DIR" --batch_size "$BATCH_SIZE" --lr "$LR"
      --lora_lr "$LORA_LR" --max_grad_norm "$MAX_GRAD_NORM" --max_length "$MAX_LENGTH" --device "$DEVICE"
      --dtype "$DTYPE" --seed "$SEED" --eval_after_each_round --eval_batch_size "$EVAL_BATCH_SIZE" --demo 2
      --train_max_function_calls_per_round "$TRAIN_CALLS_LIST" --test_max_function_calls_per_round "$TEST_CALLS_LIST"
      --prompt_format "$PROMPT_FORMAT" --tool_init_norm "$TOOL_INIT_NORM" --memory_dtype "$MEMORY_DTYPE"
      --ground_truth_style "$GROUND_TRUTH_STYLE" --prototype_weight "$PROTOTYPE_WEIGHT"
      --stop_tokens "$STOP_TOKENS" --query_cut "$QUERY_CUT" --rng "$RNG")
[[ -n "$MODEL" ]] && args+=(--model_name "$MODEL")
args+=(--validation_split "$VALIDATION_SPLIT")
[[ -n "$OUTPUT_DIR" ]] && args+=(--output_dir "$OUTPUT_DIR")
[[ "$EVAL_ALL_PREVIOUS" == true ]] && args+=(--eval_all_previous)
[[ "$CURRICULUM_LEARNING" == true ]] && args+=(--curriculum_learning)
[[ "$RENORM_ACTIVE_TOOLS" == true ]] && args+=(--renorm_active_tools --renorm_rows "$RENORM_ROWS"
                                               --renorm_from_round "$RENORM_FROM_ROUND")
[[ "$DECOUPLE_EMBEDDINGS" == true ]] && args+=(--decouple_embeddings)
[[ "$USE_LORA" == true ]] && args+=(--use_lora --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA"
                                    --lora_dropout "$LORA_DROPOUT" --lora_target_modules "$LORA_TARGET_MODULES")
[[ "$USE_LORA" == true && "$FREEZE_LORA_AFTER_FIRST" == true ]] && args+=(--freeze_lora_after_first)
[[ "$OFFER_ALL_TOOLS" == true ]] && args+=(--offer_all_tools)
[[ "$UNCONSTRAINED_DECODING" == true ]] && args+=(--unconstrained_decoding)
[[ "$USE_GROUND_TRUTH_TOOLS" == true ]] && args+=(--use_ground_truth_tools)
[[ "$SAVE_CHECKPOINTS" == true ]] && args+=(--save_checkpoints)
[[ "$SHARD_BACKBONE" == true ]] && args+=(--shard_backbone)

# Step 1: check what needs no data (flags, output place, backbone), then each round's files.
preflight main_sequential.py "${args[@]}" "$@"
# Each round's train/test/description files (made again when their settings changed).
generate_round_data

# Step 2: the rounds.
[[ "${DRY_RUN:-false}" == true ]] || echo "Running TokMem rounds $TRAINING_ROUNDS"
python_cli main_sequential.py
run_seeds tokmem "${args[@]}" "$@"
