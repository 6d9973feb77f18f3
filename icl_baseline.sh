#!/usr/bin/env bash
# In-context baselines on one tool range: every tool described in the prompt (ICL), then only the top RETRIEVAL_K
# retrieved tools (RAG). Edit the variables below (the data's: data_rounds.sh) and run `bash icl_baseline.sh`. The
# defaults are the embedded default (synthetic xLAM-format data, the tiny backbone built offline, CPU). Each run
# prints its scores and the prompt tokens per query of ICL, RAG and tool memory (TokMem), and writes
# runs/icl_<timestamp> or runs/icl_rag_<timestamp>.
# For the paper-scale setting: MODEL=meta-llama/Llama-3.2-3B-Instruct DATA_SOURCE=xlam XLAM_PATH=/path/to/xlam.json
# TOOLS=1-50 SAMPLES_PER_TOOL=50 TRAIN_SIZE=5000 TEST_SIZE=500 BATCH_SIZE=4
# PRESET=paper: the original's in-context run (tools 51-100, RAG only, k=5, its prompt and retrieval text); any
# variable set in the environment wins over it. DRY_RUN=true prints the commands and runs nothing.
set -euo pipefail
source "$(dirname "$0")/presets.sh"
start_script icl "$0" "$@"   # cd here; --help; PRESET; the rounds' data variables (data_rounds.sh)

# ---- experiment -------------------------------------------------------------------------------------------------
TOOLS=${TOOLS:-1-20}                               # START-END: the tool ranks offered to the model
# ---- generation and retrieval -----------------------------------------------------------------------------------
BATCH_SIZE=${BATCH_SIZE:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
MAX_SAMPLES=${MAX_SAMPLES:-}                       # empty: the whole test set
RUN_ALL_TOOLS=${RUN_ALL_TOOLS:-true}               # true: ICL with every tool of TOOLS in the prompt
USE_RAG=${USE_RAG:-true}                           # true: then RAG with the top RETRIEVAL_K retrieved tools
RETRIEVAL_K=${RETRIEVAL_K:-5}
RETRIEVAL_TEXT=${RETRIEVAL_TEXT:-toolkit}          # toolkit | original: the text each tool is embedded from
ICL_PROMPT=${ICL_PROMPT:-toolkit}                  # toolkit | original: the original's hand-written prompt
ICL_ANSWER=${ICL_ANSWER:-toolkit}                  # toolkit | original: how an answer is read into calls
ICL_SHOTS=${ICL_SHOTS:-0}                          # solved examples from the range's training file before each query
# ---- model, device, processes, SEED: data_rounds.sh, shared by the three scripts --------------------------------

int_var BATCH_SIZE MAX_NEW_TOKENS RETRIEVAL_K
bool_var RUN_ALL_TOOLS USE_RAG
if ! [[ $ICL_SHOTS =~ ^[0-9]+$ ]]; then
    echo "error: ICL_SHOTS must be an integer >= 0, got '$ICL_SHOTS'" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}

if ! [[ $TOOLS =~ ^([1-9][0-9]*)-([1-9][0-9]*)$ ]] || (( BASH_REMATCH[2] < BASH_REMATCH[1] )); then
    echo "error: TOOLS must be START-END with 1 <= START <= END, got '$TOOLS'" >&2
    exit 2
fi
START_TOOL=${BASH_REMATCH[1]}
TOOLS_PER_ROUND=$((BASH_REMATCH[2] - BASH_REMATCH[1] + 1))

# Step 1: the range's test and description files, generated unless present (one round of data_rounds.sh).
NUM_ROUNDS=1
EPOCHS_PER_ROUND=1
generate_round_data

# Step 2: ICL, then RAG, on the range's test file (its descriptions file is the one paired with it).
test_file=$("$PYTHON" round_files.py --data_dir "$DATA_DIR" --start "$START_TOOL" --end "${TOOLS#*-}" \
            --test_max_function_calls "$TEST_CALLS_LIST")
args=(--test_data "$test_file"
      --batch_size "$BATCH_SIZE" --max_new_tokens "$MAX_NEW_TOKENS" --device "$DEVICE" --dtype "$DTYPE" --seed "$SEED"
      --icl_prompt "$ICL_PROMPT" --icl_answer "$ICL_ANSWER" --icl_shots "$ICL_SHOTS")
[[ -n "$MODEL" ]] && args+=(--model_name "$MODEL")
[[ -n "$MAX_SAMPLES" ]] && args+=(--max_samples "$MAX_SAMPLES")
[[ "$SHARD_BACKBONE" == true ]] && args+=(--shard_backbone)
python_cli icl_baseline.py

dry=${DRY_RUN:-false}
if [[ "$RUN_ALL_TOOLS" == true ]]; then
    [[ "$dry" == true ]] || echo "ICL: all tools $TOOLS in the prompt"
    run_step "${CLI[@]}" "${args[@]}" "$@"
fi
if [[ "$USE_RAG" == true ]]; then
    [[ "$dry" == true ]] || echo "RAG: the top $RETRIEVAL_K retrieved tools of $TOOLS in the prompt"
    run_step "${CLI[@]}" "${args[@]}" --use_rag --retrieval_k "$RETRIEVAL_K" --retrieval_text "$RETRIEVAL_TEXT" "$@"
fi
