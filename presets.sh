# Shared by run_n_rounds_main.sh, run_n_rounds_lora.sh and icl_baseline.sh (sourced, not run): the paper preset,
# DRY_RUN, --help and the checks of the scripts' variables.
#
# PRESET=paper gives every variable the original toolkit's value (MANGA-UOFA/TokMem, compositional/, v1.0: its
# scripts' settings and, through the departure flags, its behaviour) unless the variable is set in the environment,
# even to an empty value: `PRESET=paper MODEL= bash run_n_rounds_main.sh` keeps the embedded backbone.
# DRY_RUN=true prints each command a script would run, one line each, exactly as it would run, and runs nothing.

# start_script NAME SCRIPT ARGS...: what every script does first: work in the scripts' folder, answer -h/--help, apply
# PRESET (NAME: main, lora or icl), and set the rounds' data variables (data_rounds.sh, which the three share).
start_script() {
    local name=$1 script=$2
    shift 2
    cd "$(dirname "$script")"
    script_help "$(basename "$script")" "$@"
    refuse_variable_arguments "$(basename "$script")" "$@"
    apply_preset "$name"
    source ./data_rounds.sh
}

# refuse_variable_arguments SCRIPT ARGS...: an argument that looks like a variable (OUTPUT_DIR=x) would reach the Python
# CLI as an unknown argument after the data step; refuse it at once, saying how variables are set.
refuse_variable_arguments() {
    local script=$1 arg
    shift
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
            echo "error: argument '$arg' looks like a variable; variables go before the command, in the environment:" \
                 "${arg%%=*}=... bash $script (arguments after the script go to the Python CLI as flags)" >&2
            exit 2
        fi
    done
}

# preflight CLI ARGS...: run the Python CLI with --preflight (one process): the flags, the output place and the backbone
# (tool slots, LoRA modules) are checked before the data step, which may take minutes. Skipped when DRY_RUN is true.
preflight() {
    [[ "${DRY_RUN:-false}" == true ]] && return 0
    "$PYTHON" "$@" --preflight
}

# apply_preset SCRIPT: SCRIPT is main, lora or icl. Assigns only variables that are unset (${VAR=value}).
apply_preset() {
    case "${PRESET:-}" in
        "" | none) return 0 ;;
        paper) ;;
        *) echo "error: PRESET must be paper or empty, got '${PRESET}'" >&2; exit 2 ;;
    esac
    # The original's scripts: Llama-3.2-3B-Instruct in bfloat16 on the real xLAM file, cut its way.
    : "${MODEL=meta-llama/Llama-3.2-3B-Instruct}" "${DTYPE=bfloat16}" "${DATA_SOURCE=xlam}" "${RECUT=original}"
    : "${SAMPLES_PER_TOOL=50}" "${TRAIN_SIZE=5000}" "${TEST_SIZE=500}" "${TRAIN_MAX_CALLS=4}" "${TEST_MAX_CALLS=4}"
    : "${TRAIN_MULTI_TOOL_RATIOS=0.5,0.5}" "${TEST_MULTI_TOOL_RATIOS=0.5,0.5}" "${SEED=42}" "${MAX_LENGTH=512}"
    : "${PROMPT_FORMAT=original}"
    case "$1" in
        main)
            : "${NUM_ROUNDS=2}" "${TOOLS_PER_ROUND=50}" "${START_TOOL=1}" "${EPOCHS_PER_ROUND=1,3}"
            : "${TRAIN_MAX_CALLS_PER_ROUND=4,4}" "${TEST_MAX_CALLS_PER_ROUND=4,4}"
            : "${BATCH_SIZE=2}" "${LR=5e-3}" "${LORA_LR=5e-5}" "${EVAL_BATCH_SIZE=16}"
            : "${USE_LORA=true}" "${FREEZE_LORA_AFTER_FIRST=true}" "${LORA_TARGET_MODULES=q_proj,v_proj}"
            : "${LORA_R=8}" "${LORA_ALPHA=32}" "${LORA_DROPOUT=0.1}"
            : "${RENORM_ACTIVE_TOOLS=true}" "${RENORM_ROWS=output}" "${RENORM_FROM_ROUND=3}"
            : "${DECOUPLE_EMBEDDINGS=false}" "${CURRICULUM_LEARNING=false}" "${EVAL_ALL_PREVIOUS=false}"
            : "${SAVE_CHECKPOINTS=true}"
            # The original's behaviour where this toolkit departs from it (docs/paper.md: Departures from the original).
            : "${MAX_GRAD_NORM=0}" "${TOOL_INIT_NORM=unit}" "${MEMORY_DTYPE=model}" "${OFFER_ALL_TOOLS=true}"
            : "${UNCONSTRAINED_DECODING=true}" "${GROUND_TRUTH_STYLE=replace}" "${PROTOTYPE_WEIGHT=0}"
            : "${STOP_TOKENS=generation_config}" "${QUERY_CUT=none}" "${RNG=original}"
            ;;
        lora)
            : "${NUM_ROUNDS=2}" "${TOOLS_PER_ROUND=50}" "${START_TOOL=1}" "${EPOCHS_PER_ROUND=1}"
            : "${TRAIN_MAX_CALLS_PER_ROUND=4,4}" "${TEST_MAX_CALLS_PER_ROUND=4,4}"
            : "${BATCH_SIZE=2}" "${LR=5e-5}" "${EVAL_BATCH_SIZE=16}"
            : "${LORA_TARGET_MODULES=q_proj,v_proj}" "${LORA_R=8}" "${LORA_ALPHA=32}" "${LORA_DROPOUT=0.1}"
            : "${REINIT_LORA=true}" "${EVAL_ALL_PREVIOUS=false}" "${SAVE_CHECKPOINTS=true}"
            : "${USE_REPLAY_BUFFER=false}" "${REPLAY_BUFFER_SIZE=1000}" "${REPLAY_RATIO=0.2}"
            : "${MAX_GRAD_NORM=0}" "${REPLAY_POLICY=original}"
            ;;
        icl)
            : "${TOOLS=51-100}" "${BATCH_SIZE=16}" "${USE_RAG=true}" "${RUN_ALL_TOOLS=false}" "${RETRIEVAL_K=5}"
            : "${ICL_PROMPT=original}" "${ICL_ANSWER=original}" "${RETRIEVAL_TEXT=original}"
            ;;
        *) echo "error: apply_preset: unknown script $1" >&2; exit 2 ;;
    esac
}

# run_step CMD...: run a step, or print it (one line, quoted where the shell needs it) when DRY_RUN is true.
run_step() {
    if [[ "${DRY_RUN:-false}" == true ]]; then
        local arg sep=""
        for arg in "$@"; do
            if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then printf '%s%s' "$sep" "$arg"; else printf '%s%q' "$sep" "$arg"; fi
            sep=" "
        done
        printf '\n'
    else
        "$@"
    fi
}

# python_cli SCRIPT: set the array CLI to the command that runs a Python CLI: "$PYTHON" SCRIPT, or with NPROC > 1 the
# same under torchrun, NPROC processes on this machine ("$PYTHON" -m torch.distributed.run, torchrun of the same
# interpreter). The data steps stay one process.
python_cli() {
    if (( NPROC > 1 )); then
        CLI=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$1")
    else
        CLI=("$PYTHON" "$1")
    fi
}

# bool_var NAME...: each variable must read as a boolean; it is rewritten as true or false.
bool_var() {
    local name value
    for name in "$@"; do
        value=${!name:-false}
        case "${value,,}" in
            true | 1 | yes | y | on) printf -v "$name" true ;;
            false | 0 | no | n | off) printf -v "$name" false ;;
            *) echo "error: $name must be true or false (or yes/no, 1/0, on/off), got '$value'" >&2; exit 2 ;;
        esac
    done
}

# int_var NAME...: each variable must be a positive integer.
int_var() {
    local name
    for name in "$@"; do
        if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
            echo "error: $name must be a positive integer, got '${!name}'" >&2
            exit 2
        fi
    done
}

# number_var NAME...: each variable must be a number >= 0 (1, 0.5, 1e-2), so that a typo stops the script before the
# data step instead of in the CLI after it.
number_var() {
    local name
    for name in "$@"; do
        if ! [[ ${!name} =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]]; then
            echo "error: $name must be a number >= 0, got '${!name}'" >&2
            exit 2
        fi
    done
}

# list_variables FILE: each `NAME=${NAME:-default}  # comment` line of FILE as `  NAME (default: default)   # comment`.
list_variables() {
    grep -E '^[A-Z_]+=\$\{[A-Z_]+:-' "$1" | sed -E -e 's/^([A-Z_]+)=\$\{[A-Z_]+:-([^}]*)\}/  \1 (default: \2)/' -e 's/[[:space:]]+#/   #/'
}

# script_help SCRIPT ARGS...: with -h or --help among ARGS, print the script's header and variables and exit.
script_help() {
    local script=$1 arg
    shift
    for arg in "$@"; do
        if [[ "$arg" == -h || "$arg" == --help ]]; then
            sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p}' "$script"
            echo
            echo "Variables (set them in the environment, e.g. SEED=7 bash $script):"
            list_variables "$script"
            echo
            echo "Shared by the three scripts (data_rounds.sh): the rounds' data, the model, device, processes and seed:"
            list_variables "$(dirname "${BASH_SOURCE[0]}")/data_rounds.sh"
            echo
            echo "PRESET=paper: the original toolkit's settings (see presets.sh); DRY_RUN=true: print the commands only."
            echo "Other arguments are passed on to the Python CLI; its own flags: python3 <cli>.py --help"
            exit 0
        fi
    done
}

# seeds_var: SEEDS, when set, must be comma-separated integers (SEEDS=42,1,2).
seeds_var() {
    if [[ -n "${SEEDS:-}" && ! "$SEEDS" =~ ^-?[0-9]+(,-?[0-9]+)*$ ]]; then
        echo "error: SEEDS must be comma-separated integers (e.g. 42,1,2), got '$SEEDS'" >&2
        exit 2
    fi
}

# run_seeds NAME ARGS...: run the CLI ("${CLI[@]}" ARGS) once, or with SEEDS=42,1,2 once per seed, one after another,
# each with --seed S into PARENT/seed_S (PARENT: OUTPUT_DIR, default runs/NAME_seeds_<timestamp>), so that
# `compare_runs.py PARENT/seed_*` pools them (mean ± std over the seeds).
run_seeds() {
    local name=$1 seed parent
    shift
    if [[ -z "${SEEDS:-}" ]]; then
        run_step "${CLI[@]}" "$@"
        return
    fi
    parent=${OUTPUT_DIR:-runs/${name}_seeds_$(date +%Y%m%d_%H%M%S)}
    for seed in ${SEEDS//,/ }; do
        run_step "${CLI[@]}" "$@" --seed "$seed" --output_dir "$parent/seed_$seed"
    done
    [[ "${DRY_RUN:-false}" == true ]] ||
        echo "runs of seeds $SEEDS in $parent; pool them: python3 compare_runs.py $parent/seed_*"
}
