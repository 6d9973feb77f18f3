"""What a TokMem run promises across rounds, checked on one recorded run: each round trains only its own rows, the
other rows and a frozen LoRA stay bit for bit, renormalisation reaches the inactive rows' mean norm, a resumed run
trains only the rounds it lacks (with the earlier rounds' query prototypes from the checkpoint), and a diverging round
keeps the last good checkpoint.

One uninterrupted run (module scope, in this process, every call of train_round recorded) is the reference of every
test; only the killed run is a separate process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main_sequential
import training
from conftest import TrainingRecorder, kill_in_round_two, numbers, run_in_process

SCRIPT = "main_sequential.py"
ROUND_TOOLS = ({"get_weather", "convert_currency", "search_flights"}, {"calculate_bmi", "book_table", "translate_text"})
ROUND_NAMES = ("round 1-3", "round 4-6")
EPOCHS = (2, 3)
TRAIN_SAMPLES, BATCH_SIZE = 24, 2  # per round, in two_round_data


def cli_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:2,4-6:3", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", str(BATCH_SIZE), "--eval_all_previous", "--max_new_tokens", "12",
            "--use_lora", "--freeze_lora_after_first", "--renorm_active_tools", "--renorm_from_round", "2",
            "--prototype_weight", "1", "--save_checkpoints",
            "--device", "cpu", "--seed", "7"]


class Reference:
    """The uninterrupted run: its directory, summary and recorded rounds."""

    def __init__(self, out: Path, summary: dict, recorder: TrainingRecorder):
        self.out, self.summary, self.records = out, summary, recorder.records
        meta = json.loads((out / "checkpoints" / "round_2" / "tool_memory.json").read_text())
        self.tool_names: list[str] = meta["tool_names"]

    def mask(self, round_index: int) -> torch.Tensor:
        """The rows of a round's tools, from the checkpoint's tool list and the data's tool names."""
        return torch.tensor([name in ROUND_TOOLS[round_index] for name in self.tool_names])

    def rows(self, round_number: int) -> torch.Tensor:
        return load_file(str(self.out / "checkpoints" / f"round_{round_number}" / "tool_memory.safetensors"))["input_rows"]

    def adapter(self, round_number: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "checkpoints" / f"round_{round_number}" / "lora" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, two_round_data, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("tokmem_reference") / "whole"
    recorder = TrainingRecorder()
    summary = run_in_process(main_sequential.main, cli_args(tiny_model_dir, two_round_data, out), recorder)
    return Reference(out, summary, recorder)


def test_each_round_is_trained_once_for_its_epochs(reference):
    assert [r.description for r in reference.records] == list(ROUND_NAMES)
    expected_steps = [-(-TRAIN_SAMPLES // BATCH_SIZE) * epochs for epochs in EPOCHS]
    assert [r.steps for r in reference.records] == expected_steps
    assert [s["steps"] for s in reference.summary["round_stats"]] == expected_steps


def test_a_round_changes_its_own_rows_and_no_other(reference):
    for index, record in enumerate(reference.records):
        mask = reference.mask(index)
        assert torch.equal(record.active, mask), "active_tool_mask names the round's tools"
        (before,), (after,) = record.rows_before, record.rows_after
        assert torch.equal(before[~mask], after[~mask]), f"{record.description} touched other rounds' rows"
        assert all(not torch.equal(old, new) for old, new in zip(before[mask], after[mask]))


def test_checkpoints_keep_the_other_rounds_rows_bit_for_bit(reference):
    first, second = reference.mask(0), reference.mask(1)
    initial = reference.records[0].rows_before[0]
    after_one, after_two = reference.rows(1), reference.rows(2)
    assert torch.equal(after_one[second], initial[second]), "round 2's rows were changed in round 1"
    assert torch.equal(after_two[first], after_one[first]), "round 1's rows were changed in round 2"
    assert not torch.equal(after_two[second], after_one[second])


def test_a_frozen_lora_stays_bit_identical_after_round_one(reference):
    first, second = reference.records
    assert (first.train_lora, second.train_lora) == (True, False)
    assert first.lora_before and any(not torch.equal(first.lora_before[k], first.lora_after[k]) for k in first.lora_before)
    assert all(torch.equal(first.lora_after[k], second.lora_after[k]) for k in first.lora_after)
    saved_one, saved_two = reference.adapter(1), reference.adapter(2)
    assert saved_one.keys() == saved_two.keys() and saved_one
    assert all(torch.equal(saved_one[k], saved_two[k]) for k in saved_one)


def test_renormalisation_puts_a_rounds_rows_at_the_mean_norm_of_the_others_from_the_asked_round(reference):
    for round_number, rows in ((1, reference.rows(1)), (2, reference.rows(2))):
        mask = reference.mask(round_number - 1)
        others = [float(row.norm()) for row in rows[~mask]]
        target = sum(others) / len(others)
        norms = rows[mask].norm(dim=-1)
        at_target = torch.allclose(norms, torch.full_like(norms, target), rtol=1e-5)
        assert at_target == (round_number >= 2), f"--renorm_from_round 2, round {round_number}: {norms} vs {target}"


def test_each_round_records_its_tools_prototypes_and_the_next_round_trains_against_them(reference):
    first, second = reference.mask(0), reference.mask(1)
    one = load_file(str(reference.out / "checkpoints" / "round_1" / "tool_memory.safetensors"))
    two = load_file(str(reference.out / "checkpoints" / "round_2" / "tool_memory.safetensors"))
    assert torch.equal(one["prototype_count"] > 0, first) and torch.equal(two["prototype_count"] > 0, first | second)
    for key in ("prototype_mean", "prototype_std", "prototype_count"):
        assert torch.equal(two[key][first], one[key][first]), f"round 2 changed round 1's {key}"
    assert (one["prototype_std"][first] > 0).all()
    stats = reference.summary["round_stats"]
    assert "mean_prototype_loss" not in stats[0] and stats[1]["mean_prototype_loss"] > 0


@pytest.mark.slow
def test_sigkill_in_round_two_then_resume_trains_only_round_two(reference, tiny_model_dir, two_round_data, tmp_path):
    args = cli_args(tiny_model_dir, two_round_data, tmp_path / "killed")
    kill_in_round_two(SCRIPT, args, tmp_path)
    recorder = TrainingRecorder()
    resumed = run_in_process(main_sequential.main, args + ["--resume"], recorder)
    assert recorder.descriptions == [ROUND_NAMES[1]], "a resumed run trains only the rounds it lacks"
    (record,) = recorder.records
    # Round 2 starts from round 1's checkpoint: the killed process's rows and adapter, which equal the reference's.
    assert torch.equal(record.rows_before[0], reference.records[0].rows_after[0])
    assert all(torch.equal(v, reference.records[0].lora_after[k]) for k, v in record.lora_before.items())
    # Round 1's numbers come from the killed process, round 2's from this one: both reproduce the reference.
    assert numbers(resumed) == numbers(reference.summary)
    out = tmp_path / "killed" / "checkpoints" / "round_2"
    assert torch.equal(load_file(str(out / "tool_memory.safetensors"))["input_rows"], reference.rows(2))


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_numbers(reference, tiny_model_dir, two_round_data,
                                                                     tmp_path):
    out = tmp_path / "finished"
    shutil.copytree(reference.out, out)
    recorder = TrainingRecorder()
    again = run_in_process(main_sequential.main, cli_args(tiny_model_dir, two_round_data, out) + ["--resume"], recorder)
    assert recorder.records == []
    assert numbers(again) == numbers(reference.summary)


def test_nan_loss_stops_the_round_and_keeps_the_last_good_checkpoint(tiny_model_dir, two_round_data, tmp_path,
                                                                     monkeypatch, capsys, restore_logging):
    real_train_round = training.train_round
    calls = []

    def diverge_in_round_two(model, loader, settings, active, train_lora, description, **kwargs):
        calls.append(description)
        if len(calls) == 2:
            with torch.no_grad():
                model.memory.input_rows[active] = float("nan")
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


def test_a_full_disk_is_one_line_leaves_no_checkpoint_folder_and_the_run_resumes(reference, tiny_model_dir,
                                                                                 two_round_data, tmp_path, monkeypatch,
                                                                                 capsys, restore_logging):
    import errno

    import model as model_module
    from common import run_cli

    real_save = model_module.save_file
    calls = []

    def full_disk_in_round_two(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # round 1 wrote its rows and its adapter
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    out = tmp_path / "run"
    args = cli_args(tiny_model_dir, two_round_data, out)
    with monkeypatch.context() as patch:
        patch.setattr(model_module, "save_file", full_disk_in_round_two)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main_sequential.main, args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"{Path(sys.argv[0]).name}: error: cannot write {out}/checkpoints/round_2/"
                       "tool_memory.safetensors: No space left on device")
    assert json.loads((out / "state.json").read_text())["completed_rounds"] == 1
    assert not (out / "checkpoints" / "round_2").exists() and not (out / "run.lock").exists()
    resumed = run_in_process(main_sequential.main, args + ["--resume"], TrainingRecorder())
    assert numbers(resumed) == numbers(reference.summary)
