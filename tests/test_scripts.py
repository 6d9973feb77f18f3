"""The experiment scripts: the paper preset, DRY_RUN, --help, variable checks and the shared data step."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# The original toolkit's settings (its scripts and code; docs/paper.md: Departures from the original), as flags of the training step.
PAPER_MAIN = {
    "--training_rounds": "1-50:1,51-100:3", "--batch_size": "2", "--lr": "5e-3", "--lora_lr": "5e-5",
    "--max_grad_norm": "0", "--max_length": "512", "--dtype": "bfloat16", "--seed": "42", "--eval_batch_size": "16",
    "--train_max_function_calls_per_round": "4,4", "--test_max_function_calls_per_round": "4,4",
    "--prompt_format": "original", "--tool_init_norm": "unit", "--memory_dtype": "model",
    "--ground_truth_style": "replace", "--model_name": "meta-llama/Llama-3.2-3B-Instruct",
    "--renorm_rows": "output", "--renorm_from_round": "3", "--lora_r": "8", "--lora_alpha": "32",
    "--lora_dropout": "0.1", "--lora_target_modules": "q_proj,v_proj", "--prototype_weight": "0",
    "--rng": "original", "--stop_tokens": "generation_config", "--query_cut": "none",
}
PAPER_MAIN_SWITCHES = {"--renorm_active_tools", "--use_lora", "--freeze_lora_after_first", "--offer_all_tools",
                       "--unconstrained_decoding", "--save_checkpoints", "--eval_after_each_round"}
PAPER_LORA = {
    "--training_rounds": "1-50:1,51-100:1", "--batch_size": "2", "--lr": "5e-5", "--lora_target_modules": "q_proj,v_proj",
    "--lora_r": "8", "--lora_alpha": "32", "--max_grad_norm": "0", "--prompt_format": "original", "--dtype": "bfloat16",
    "--model_name": "meta-llama/Llama-3.2-3B-Instruct",
}
PAPER_DATA = {"--max_samples_per_tool": "50", "--train_size": "5000", "--test_size": "500",
              "--train_max_function_calls": "4", "--test_max_function_calls": "4", "--source": "xlam",
              "--train_multi_tool_ratios": "0.5,0.5", "--test_multi_tool_ratios": "0.5,0.5", "--recut": "original",
              "--seed": "42"}


def run_script(name: str, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run(["bash", str(REPO_ROOT / name), *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def parse_command(line: str) -> tuple[str, dict[str, str], set[str]]:
    """(script, {flag: value}, {switch}) of one printed command line."""
    words = shlex.split(line)
    script, flags, switches = words[1], {}, set()
    rest = words[2:]
    for i, word in enumerate(rest):
        if not word.startswith("--"):
            continue
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            flags[word] = rest[i + 1]
        else:
            switches.add(word)
    return script, flags, switches


def dry_run(name: str, tmp_path: Path, **env: str) -> list[tuple[str, dict[str, str], set[str]]]:
    result = run_script(name, tmp_path, DRY_RUN="true", **env)
    assert result.returncode == 0, result.stderr
    return [parse_command(line) for line in result.stdout.splitlines()]


def test_paper_preset_prints_the_originals_settings(tmp_path):
    commands = dry_run("run_n_rounds_main.sh", tmp_path, PRESET="paper")
    assert [c[0] for c in commands] == ["xlam_datasets.py", "xlam_datasets.py", "main_sequential.py"]
    assert [c[1]["--top_k"] for c in commands[:2]] == ["1-50", "51-100"]
    for _, flags, _ in commands[:2]:
        assert {k: flags[k] for k in PAPER_DATA} == PAPER_DATA
    _, flags, switches = commands[2]
    assert {k: flags.get(k) for k in PAPER_MAIN} == PAPER_MAIN
    assert switches == PAPER_MAIN_SWITCHES  # EVAL_ALL_PREVIOUS=false, curriculum and decoupling off
    lora = dry_run("run_n_rounds_lora.sh", tmp_path, PRESET="paper")[-1]
    assert lora[0] == "lora_sequential.py" and {k: lora[1].get(k) for k in PAPER_LORA} == PAPER_LORA
    assert lora[2] == {"--reinit_lora_after_each_round", "--save_checkpoints", "--eval_after_each_round"}
    icl = dry_run("icl_baseline.sh", tmp_path, PRESET="paper")
    assert [c[0] for c in icl] == ["xlam_datasets.py", "icl_baseline.py"]  # RAG only, as the original
    assert icl[1][1]["--retrieval_k"] == "5" and icl[1][1]["--batch_size"] == "16" and "--use_rag" in icl[1][2]
    assert icl[1][1]["--test_data"].endswith("tools51-100_4calls.json")
    assert [icl[1][1][f] for f in ("--icl_prompt", "--icl_answer", "--retrieval_text")] == ["original"] * 3
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_user_settings_win_over_the_preset_even_when_empty(tmp_path):
    commands = dry_run("run_n_rounds_main.sh", tmp_path, PRESET="paper", MODEL="", DATA_SOURCE="synthetic",
                       NUM_ROUNDS="3", TOOLS_PER_ROUND="10", LR="1e-3", USE_LORA="no")
    assert len(commands) == 4
    _, flags, switches = commands[-1]
    assert "--model_name" not in flags  # MODEL= keeps the embedded backbone
    assert flags["--lr"] == "1e-3" and flags["--training_rounds"] == "1-10:1,11-20:3,21-30:3"
    # A per-round list shorter than the rounds repeats its last value, as the original's scripts do.
    assert flags["--train_max_function_calls_per_round"] == "4,4,4"
    assert "--use_lora" not in switches and "--freeze_lora_after_first" not in switches
    assert commands[0][1]["--source"] == "synthetic"
    assert flags["--prompt_format"] == "original"  # what the user did not set still comes from the preset


def test_default_dry_run_is_the_embedded_default(tmp_path):
    commands = dry_run("run_n_rounds_main.sh", tmp_path)
    _, flags, switches = commands[-1]
    assert flags["--training_rounds"] == "1-10:3,11-20:3,21-30:3" and "--model_name" not in flags
    assert flags["--prompt_format"] == "chat" and flags["--max_grad_norm"] == "1.0"
    assert flags["--prototype_weight"] == "0"  # the paper's method; the prototype loss is an opt-in extension
    assert flags["--rng"] == "toolkit" and flags["--stop_tokens"] == "eot" and flags["--query_cut"] == "head"
    assert {"--renorm_active_tools", "--eval_all_previous"} <= switches and "--offer_all_tools" not in switches


@pytest.mark.parametrize("script, parent", [("run_n_rounds_main.sh", "out/many"),
                                            ("run_n_rounds_lora.sh", "runs/lora_seeds_")])
def test_seeds_run_one_after_another_into_one_parent_directory(tmp_path, script, parent):
    env = {"OUTPUT_DIR": parent} if parent == "out/many" else {}
    commands = dry_run(script, tmp_path, SEEDS="42,1,2", VALIDATION_SPLIT="0.1", **env)[-3:]
    assert [flags["--seed"] for _, flags, _ in commands] == ["42", "1", "2"]
    outputs = [flags["--output_dir"] for _, flags, _ in commands]
    assert all(out.startswith(parent) for out in outputs) and len({str(Path(o).parent) for o in outputs}) == 1
    assert [Path(o).name for o in outputs] == ["seed_42", "seed_1", "seed_2"]
    assert all(flags["--validation_split"] == "0.1" for _, flags, _ in commands)


@pytest.mark.parametrize("env, message", [
    ({"PRESET": "papers"}, "PRESET must be paper or empty, got 'papers'"),
    ({"USE_LORA": "maybe"}, "USE_LORA must be true or false"),
    ({"NUM_ROUNDS": "abc"}, "NUM_ROUNDS must be a positive integer, got 'abc'"),
    ({"EPOCHS_PER_ROUND": "1,2,3,4"}, "EPOCHS_PER_ROUND has 4 values for NUM_ROUNDS=3"),
    ({"PROTOTYPE_WEIGHT": "abc"}, "PROTOTYPE_WEIGHT must be a number >= 0, got 'abc'"),
    ({"LR": "-1e-2"}, "LR must be a number >= 0, got '-1e-2'"),
    ({"SEEDS": "42,x"}, "SEEDS must be comma-separated integers (e.g. 42,1,2), got '42,x'"),
])
def test_bad_script_variables_are_one_line_errors(tmp_path, env, message):
    result = run_script("run_n_rounds_main.sh", tmp_path, DRY_RUN="true", **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("spelling, expected", [("yes", True), ("1", True), ("ON", True), ("no", False), ("0", False)])
def test_boolean_spellings(tmp_path, spelling, expected):
    _, _, switches = dry_run("run_n_rounds_main.sh", tmp_path, USE_LORA=spelling)[-1]
    assert ("--use_lora" in switches) is expected


@pytest.mark.parametrize("script", ["run_n_rounds_main.sh", "run_n_rounds_lora.sh", "icl_baseline.sh"])
def test_help_shows_the_variables_and_runs_nothing(tmp_path, script):
    result = run_script(script, tmp_path, "--help")
    assert result.returncode == 0 and "PRESET=paper" in result.stdout and "(default: " in result.stdout
    assert "SEED (default: 42)" in result.stdout and "SAMPLES_PER_TOOL (default: 30)" in result.stdout  # data_rounds.sh's
    assert not (tmp_path / "data").exists()


def test_data_step_asks_for_every_round_and_pads_per_round_lists(tmp_path):
    """Every round goes to xlam_datasets.py --reuse_if_unchanged, which keeps or remakes the files by their manifest."""
    (tmp_path / "xlam_datasets.py").write_text("import sys\nprint('CALL', ' '.join(sys.argv[1:]))\n")
    script = (f"set -euo pipefail; source {REPO_ROOT / 'data_rounds.sh'}; generate_round_data; "
              'echo "ROUNDS $TRAINING_ROUNDS $TRAIN_CALLS_LIST $TEST_CALLS_LIST"')
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "NUM_ROUNDS": "3", "TOOLS_PER_ROUND": "10",
           "START_TOOL": "1", "SAMPLES_PER_TOOL": "30", "TRAIN_SIZE": "600", "TEST_SIZE": "60",
           "EPOCHS_PER_ROUND": "1,3", "TRAIN_MAX_CALLS": "3", "TEST_MAX_CALLS": "3",
           "TEST_MAX_CALLS_PER_ROUND": "4,2", "DATA_SOURCE": "synthetic", "DATA_DIR": "data"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = [parse_command("python " + line[len("CALL "):].replace("--", "x.py --", 1))
             for line in result.stdout.splitlines() if line.startswith("CALL")]
    assert [(c[1]["--top_k"], c[1]["--test_max_function_calls"]) for c in calls] == [
        ("1-10", "4"), ("11-20", "2"), ("21-30", "2")]
    assert all("--reuse_if_unchanged" in c[2] and c[1]["--recut"] == "toolkit" for c in calls)
    assert "ROUNDS 1-10:1,11-20:3,21-30:3 3,3,3 4,2,2" in result.stdout


def test_every_cited_document_exists():
    """A `*.md` named in code, scripts or docs is a file of the repository (relative to it, or to the citing file)."""
    pattern = re.compile(r"(?<![\w/.-])([\w./-]+\.md)\b")
    missing = []
    for path in REPO_ROOT.rglob("*"):
        if path.suffix not in (".py", ".sh", ".md") or ".git" in path.parts or not path.is_file():
            continue
        for cited in pattern.findall(path.read_text(encoding="utf-8")):
            if not ((REPO_ROOT / cited).is_file() or (path.parent / cited).is_file()):
                missing.append(f"{path.relative_to(REPO_ROOT)} cites {cited}")
    assert not missing


@pytest.mark.parametrize("script, cli", [("run_n_rounds_main.sh", "main_sequential.py"),
                                         ("run_n_rounds_lora.sh", "lora_sequential.py"),
                                         ("icl_baseline.sh", "icl_baseline.py")])
def test_nproc_runs_the_cli_under_torchrun_and_the_data_step_alone(tmp_path, script, cli):
    result = run_script(script, tmp_path, DRY_RUN="true", NPROC="2", SHARD_BACKBONE="yes")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    data = [line for line in lines if line.startswith("python3 xlam_datasets.py ")]  # data: one process
    runs = lines[len(data):]  # icl_baseline.sh: ICL, then RAG
    assert data and runs
    for line in runs:
        words = shlex.split(line)
        assert words[:6] == ["python3", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        assert words[6] == cli and "--shard_backbone" in words
    single = run_script(script, tmp_path, DRY_RUN="true").stdout.splitlines()[-1]
    assert shlex.split(single)[:2] == ["python3", cli] and "--shard_backbone" not in single
    bad = run_script(script, tmp_path, DRY_RUN="true", NPROC="two")
    assert bad.returncode == 2 and "NPROC must be a positive integer, got 'two'" in bad.stderr
