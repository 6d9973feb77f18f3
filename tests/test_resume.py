"""Kill and resume, determinism, and divergence handling of the TokMem CLI on a tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_sequential
import training
from conftest import write_round_files

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_round_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    write_round_files(data, 1, 3, ["get_weather", "convert_currency", "search_flights"], n_train=24)
    write_round_files(data, 4, 6, ["calculate_bmi", "book_table", "translate_text"], n_train=24)
    return data


def cli_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:2,4-6:3", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "2", "--eval_all_previous", "--max_new_tokens", "12",
            "--use_lora", "--device", "cpu", "--seed", "7"]


def run_to_end(args: list[str], cwd: Path) -> dict:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main_sequential.py"), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = Path(args[args.index("--output_dir") + 1])
    return json.loads((out / "summary.json").read_text())


def numbers(summary: dict) -> dict:
    return {"matrix": summary["matrix"], "round_stats": summary["round_stats"]}


@pytest.mark.slow
def test_sigkill_in_round_two_then_resume_gives_the_same_numbers(tiny_model_dir, two_round_data, tmp_path):
    reference = run_to_end(cli_args(tiny_model_dir, two_round_data, tmp_path / "whole"), tmp_path)

    killed_dir = tmp_path / "killed"
    args = cli_args(tiny_model_dir, two_round_data, killed_dir)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "main_sequential.py"), *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed_dir / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["completed_rounds"] == 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before round 2 could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(state.read_text())["completed_rounds"] == 1
    assert not (killed_dir / "summary.json").exists()
    assert not list(killed_dir.rglob("*.tmp")) or all(p.name.startswith(".") for p in killed_dir.rglob("*.tmp"))

    resumed = run_to_end(args + ["--resume"], tmp_path)
    assert numbers(resumed) == numbers(reference)
    final_names = [p.name for p in killed_dir.rglob("*") if p.is_file()]
    assert not [n for n in final_names if n.endswith(".tmp") and not n.startswith(".")]


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_metrics(tiny_model_dir, two_round_data, tmp_path):
    first = run_to_end(cli_args(tiny_model_dir, two_round_data, tmp_path / "a"), tmp_path)
    second = run_to_end(cli_args(tiny_model_dir, two_round_data, tmp_path / "b"), tmp_path)
    assert numbers(first) == numbers(second)


def test_nan_loss_stops_the_round_and_keeps_the_last_good_checkpoint(tiny_model_dir, two_round_data, tmp_path,
                                                                     monkeypatch, capsys):
    real_train_round = training.train_round
    calls = []

    def diverge_in_round_two(model, loader, settings, active, train_lora, description):
        calls.append(description)
        if len(calls) == 2:
            with torch.no_grad():
                model.tool_embeddings[active] = float("nan")
        return real_train_round(model, loader, settings, active, train_lora, description)

    monkeypatch.setattr("sequential.train_round", diverge_in_round_two)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        from common import run_cli

        run_cli(main_sequential.main, cli_args(tiny_model_dir, two_round_data, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(Path(sys.argv[0]).name + ": error: round 4-6: the loss became nan")
    assert json.loads((out / "state.json").read_text())["completed_rounds"] == 1
    assert (out / "checkpoints" / "round_1" / "tool_memory.safetensors").is_file()
    assert not (out / "checkpoints" / "round_2").exists()
