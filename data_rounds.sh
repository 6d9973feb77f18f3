# The rounds' data, the model, device, processes and seed, shared by run_n_rounds_main.sh, run_n_rounds_lora.sh and
# icl_baseline.sh (sourced, not run): their variables, so that TokMem, the LoRA baseline and the in-context baselines
# read the same files with the same model, and the data step.
#
# plan_round_data sets the three lists below without running anything; generate_round_data (which plans too) reads
# the variables below and the script's NUM_ROUNDS, TOOLS_PER_ROUND, START_TOOL,
# EPOCHS_PER_ROUND (one value or one per round), SEED and PYTHON. For every round it runs xlam_datasets.py
# --reuse_if_unchanged, which keeps a round's files when the manifest beside them says they were made with the same
# settings and remakes them otherwise; it sets
#   TRAINING_ROUNDS   e.g. "1-20:3,21-40:3,41-60:3"
#   TRAIN_CALLS_LIST  e.g. "3,3,3"   (one call cap per round)
#   TEST_CALLS_LIST   e.g. "3,3,3"

declare -F run_step > /dev/null || source "$(dirname "${BASH_SOURCE[0]}")/presets.sh"

# ---- the rounds' data (set a variable in the environment, or edit it here for all three scripts) ----------------
SAMPLES_PER_TOOL=${SAMPLES_PER_TOOL:-30}
TRAIN_SIZE=${TRAIN_SIZE:-600}
TEST_SIZE=${TEST_SIZE:-60}
TRAIN_MAX_CALLS=${TRAIN_MAX_CALLS:-3}
TEST_MAX_CALLS=${TEST_MAX_CALLS:-3}
TRAIN_MAX_CALLS_PER_ROUND=${TRAIN_MAX_CALLS_PER_ROUND:-}   # e.g. 4,4,2 (overrides TRAIN_MAX_CALLS)
TEST_MAX_CALLS_PER_ROUND=${TEST_MAX_CALLS_PER_ROUND:-}
TRAIN_MULTI_TOOL_RATIOS=${TRAIN_MULTI_TOOL_RATIOS:-0.5,0.5}  # shares of 2- and 3-tool samples synthesized
TEST_MULTI_TOOL_RATIOS=${TEST_MULTI_TOOL_RATIOS:-0.5,0.5}
RECUT=${RECUT:-toolkit}                            # toolkit | original: how xlam_datasets.py cuts the rows
DATA_SOURCE=${DATA_SOURCE:-synthetic}              # synthetic | xlam
XLAM_PATH=${XLAM_PATH:-}                           # local copy of xlam_function_calling_60k.json
DATA_DIR=${DATA_DIR:-data}

int_var SAMPLES_PER_TOOL TRAIN_SIZE TEST_SIZE TRAIN_MAX_CALLS TEST_MAX_CALLS

# ---- model, device, processes and seed (the same for all three scripts) ----------------------------------------
MODEL=${MODEL:-}                                   # empty: the embedded tiny backbone (built on first use); an HF id or directory, a .gguf file, smollm2-135m-instruct
DTYPE=${DTYPE:-auto}                               # auto: bfloat16 on CUDA, float32 on CPU
DEVICE=${DEVICE:-auto}
GPU=${GPU:-}                                       # CUDA_VISIBLE_DEVICES when not already set; empty: 0, or 0,...,NPROC-1
NPROC=${NPROC:-1}                                  # processes: one per GPU, or per core on CPU; more than 1 runs under torchrun
SHARD_BACKBONE=${SHARD_BACKBONE:-false}            # with NPROC > 1: shard the frozen backbone over them (FSDP2)
SEED=${SEED:-42}

int_var NPROC
bool_var SHARD_BACKBONE
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-${GPU:-$(seq -s, 0 $((NPROC - 1)))}}

# per_round_list NAME VALUE_OR_LIST DEFAULT: print a comma list of NUM_ROUNDS values; a shorter list is padded with
# its last value (as the original's scripts do), a longer one is an error.
per_round_list() {
    local name=$1 text=${2:-$3}
    local -a values
    IFS=',' read -r -a values <<< "$text"
    if [[ ${#values[@]} -eq 0 ]]; then
        echo "error: $name is empty" >&2
        return 2
    fi
    while [[ ${#values[@]} -lt $NUM_ROUNDS ]]; do values+=("${values[-1]}"); done
    if [[ ${#values[@]} -gt $NUM_ROUNDS ]]; then
        echo "error: $name has ${#values[@]} values for NUM_ROUNDS=$NUM_ROUNDS rounds: $text" >&2
        return 2
    fi
    local value
    for value in "${values[@]}"; do
        if ! [[ ${value// /} =~ ^[1-9][0-9]*$ ]]; then
            echo "error: $name must hold positive integers, got $text" >&2
            return 2
        fi
    done
    local IFS=','
    echo "${values[*]// /}"
}

# plan_round_data: set TRAINING_ROUNDS, TRAIN_CALLS_LIST and TEST_CALLS_LIST from the variables, reading and running
# nothing (the scripts check the run with them before the data step).
plan_round_data() {
    local epochs train_caps test_caps
    epochs=$(per_round_list EPOCHS_PER_ROUND "$EPOCHS_PER_ROUND" 1) || return 2
    train_caps=$(per_round_list TRAIN_MAX_CALLS_PER_ROUND "$TRAIN_MAX_CALLS_PER_ROUND" "$TRAIN_MAX_CALLS") || return 2
    test_caps=$(per_round_list TEST_MAX_CALLS_PER_ROUND "$TEST_MAX_CALLS_PER_ROUND" "$TEST_MAX_CALLS") || return 2
    local -a epoch_list specs=()
    IFS=',' read -r -a epoch_list <<< "$epochs"
    local round start
    for ((round = 0; round < NUM_ROUNDS; round++)); do
        start=$((START_TOOL + round * TOOLS_PER_ROUND))
        specs+=("$start-$((start + TOOLS_PER_ROUND - 1)):${epoch_list[$round]}")
    done
    local IFS=','
    TRAINING_ROUNDS="${specs[*]}"
    TRAIN_CALLS_LIST="$train_caps"
    TEST_CALLS_LIST="$test_caps"
}

generate_round_data() {
    local python=${PYTHON:-python3}
    plan_round_data || return 2
    local -a spec_list train_list test_list
    IFS=',' read -r -a spec_list <<< "$TRAINING_ROUNDS"
    IFS=',' read -r -a train_list <<< "$TRAIN_CALLS_LIST"
    IFS=',' read -r -a test_list <<< "$TEST_CALLS_LIST"

    local round range train_k test_k
    for ((round = 0; round < NUM_ROUNDS; round++)); do
        range=${spec_list[$round]%%:*}
        train_k=${train_list[$round]}
        test_k=${test_list[$round]}
        local -a cmd=("$python" xlam_datasets.py --top_k "$range" --max_samples_per_tool "$SAMPLES_PER_TOOL"
                      --train_size "$TRAIN_SIZE" --test_size "$TEST_SIZE"
                      --train_max_function_calls "$train_k" --test_max_function_calls "$test_k"
                      --train_multi_tool_ratios "$TRAIN_MULTI_TOOL_RATIOS"
                      --test_multi_tool_ratios "$TEST_MULTI_TOOL_RATIOS"
                      --recut "$RECUT" --output_dir "$DATA_DIR" --source "$DATA_SOURCE"
                      --seed "${SEED:-42}" --reuse_if_unchanged)
        [[ "$DATA_SOURCE" == xlam && -n "$XLAM_PATH" ]] && cmd+=(--xlam_path "$XLAM_PATH")
        run_step "${cmd[@]}" || return $?
    done
}
