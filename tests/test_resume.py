"""Kill and resume, determinism, and divergence handling of the TokMem CLI on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import main_sequential
import training
from conftest import kill_in_round_two, numbers, run_to_end

SCRIPT = "main_sequential.py"


def cli_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:2,4-6:3", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "2", "--eval_all_previous", "--max_new_tokens", "12",
            "--use_lora", "--device", "cpu", "--seed", "7"]


@pytest.mark.slow
def test_sigkill_in_round_two_then_resume_gives_the_same_numbers(tiny_model_dir, two_round_data, tmp_path):
    reference = run_to_end(SCRIPT, cli_args(tiny_model_dir, two_round_data, tmp_path / "whole"), tmp_path)

    args = cli_args(tiny_model_dir, two_round_data, tmp_path / "killed")
    kill_in_round_two(SCRIPT, args, tmp_path)
    resumed = run_to_end(SCRIPT, args + ["--resume"], tmp_path)
    assert numbers(resumed) == numbers(reference)


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_metrics(tiny_model_dir, two_round_data, tmp_path):
    first = run_to_end(SCRIPT, cli_args(tiny_model_dir, two_round_data, tmp_path / "a"), tmp_path)
    second = run_to_end(SCRIPT, cli_args(tiny_model_dir, two_round_data, tmp_path / "b"), tmp_path)
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
