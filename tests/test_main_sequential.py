"""Round parsing, the run directory's arithmetic, and two tiny TokMem rounds through the CLI."""

from __future__ import annotations

import json

import pytest

import main_sequential
from common import UserError
from conftest import TrainingRecorder, assert_forgetting_plot, run_in_process, write_round_files
from experiment import average_after_last, backward_transfer, parse_training_rounds, per_round_values


def test_parse_training_rounds():
    rounds = parse_training_rounds("1-50:1, 51-100:3")
    assert [(r.start, r.end, r.epochs, r.name) for r in rounds] == [(1, 50, 1, "1-50"), (51, 100, 3, "51-100")]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("1-50", "START-END:EPOCHS"),
    ("50-1:2", "1 <= start <= end"),
    ("0-5:1", "1 <= start <= end"),
    ("1-50:0", "at least 1 epoch"),
    ("1-50:1,40-60:1", "overlap"),
    ("a-b:1", "START-END:EPOCHS"),
])
def test_bad_training_rounds(text, message):
    with pytest.raises(UserError, match=message):
        parse_training_rounds(text)


def test_per_round_values():
    assert per_round_values("--x", None, 4, 3) == [4, 4, 4]
    assert per_round_values("--x", "1,2,3", 4, 3) == [1, 2, 3]
    assert per_round_values("--x", "1,2", 4, 3) == [1, 2, 2]
    with pytest.raises(UserError, match="4 values for 3 rounds"):
        per_round_values("--x", "1,2,3,4", 4, 3)
    with pytest.raises(UserError, match="integers"):
        per_round_values("--x", "1,a,3", 4, 3)


def test_average_and_backward_transfer():
    grid = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.5, 1.0]]
    assert average_after_last(grid) == pytest.approx(0.7)
    assert backward_transfer(grid) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.7)) / 2)


@pytest.mark.slow
def test_two_tiny_rounds_write_the_run_directory(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_round_files(data, 1, 3, ["get_weather", "convert_currency", "search_flights"])
    write_round_files(data, 4, 6, ["calculate_bmi", "book_table", "translate_text"])
    out = tmp_path / "run"
    args = ["--model_name", str(tiny_model_dir), "--training_rounds", "1-3:2,4-6:1", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--eval_all_previous", "--max_new_tokens", "16",
            "--use_lora", "--freeze_lora_after_first", "--use_ground_truth_tools", "--device", "cpu"]
    recorder = TrainingRecorder()
    summary = run_in_process(main_sequential.main, args, recorder)
    assert recorder.descriptions == ["round 1-3", "round 4-6"]
    assert [r.train_lora for r in recorder.records] == [True, False]
    assert "avg_tool_f1_score" in capsys.readouterr().out
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tokmem" and summary["rounds"] == ["1-3", "4-6"]
    tool_f1 = summary["matrix"]["avg_tool_f1_score"]
    assert tool_f1[0][0] is not None and tool_f1[0][1] is None and None not in tool_f1[1]
    assert summary["backward_transfer"]["avg_tool_f1_score"] == pytest.approx(tool_f1[1][0] - tool_f1[0][0])
    assert summary["average_after_last"]["avg_tool_f1_score"] == pytest.approx((tool_f1[1][0] + tool_f1[1][1]) / 2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6  # (1 + 2 test sets) x (predicted, ground-truth tools)
    gt = [r for r in records if r["mode"] == "ground_truth_tools"]
    # A random model never closes a JSON object, so the gold first tool is forced and no tool comes after it.
    assert all(r["metrics"]["avg_tool_precision"] == 1.0 for r in gt)
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["training_rounds"] == "1-3:2,4-6:1" and "torch" in config["versions"]
    assert_forgetting_plot(out / "forgetting.png")
    assert "round 1-3: 6 steps" in (out / "train.log").read_text()  # 12 samples / batch 4 x 2 epochs
    # Only the last round's checkpoint is kept without --save_checkpoints; it holds the rows and LoRA, no backbone.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round_2"]
    assert (out / "checkpoints" / "round_2" / "tool_memory.safetensors").is_file()
    assert (out / "checkpoints" / "round_2" / "lora" / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "checkpoints" / "round_2" / "tool_memory.json").read_text())
    assert sorted(meta["generation_tools"]) == sorted(meta["tool_names"]), "after round 2 all tools are offered"
    assert not list(out.rglob("*.tmp"))


class LaterRowsOutscoreLearnedOnes(TrainingRecorder):
    """Trains round 1, then makes round 2's untrained rows ten times round 1's learned ones (their logits ten times
    theirs), and stops the run at round 2: round 1's evaluation decodes with rows that would win wherever a learned
    tool is likely, unless decoding keeps them out."""

    def __call__(self, model, loader, settings, active, train_lora, description, **kwargs):
        import torch

        stats = super().__call__(model, loader, settings, active, train_lora, description, **kwargs)
        with torch.no_grad():
            rows = model.memory.input_rows
            rows[~active] = 10 * rows[active]
        return stats


@pytest.mark.parametrize("offer_all", [False, True], ids=["learned-only", "offer-all-tools"])
def test_after_round_one_decoding_offers_only_the_tools_learned_so_far(offer_all, tiny_model_dir, two_round_data,
                                                                       tmp_path, monkeypatch):
    import sequential

    predicted: list[list[str]] = []
    real_evaluate = sequential.evaluate

    def recording_evaluate(model, loader, *args, **kwargs):
        metrics, predictions = real_evaluate(model, loader, *args, **kwargs)
        predicted.extend(p["predicted_tools"] for p in predictions)
        return metrics, predictions

    monkeypatch.setattr(sequential, "evaluate", recording_evaluate)
    args = ["--model_name", str(tiny_model_dir), "--training_rounds", "1-3:2,4-6:1", "--data_dir", str(two_round_data),
            "--output_dir", str(tmp_path / "run"), "--batch_size", "4", "--max_new_tokens", "6", "--device", "cpu",
            "--seed", "5", "--eval_after_each_round"] + (["--offer_all_tools"] if offer_all else [])
    assert run_in_process(main_sequential.main, args, LaterRowsOutscoreLearnedOnes(stop_at="round 4-6")) is None
    round_one, round_two = {"get_weather", "convert_currency", "search_flights"}, {"calculate_bmi", "book_table",
                                                                                   "translate_text"}
    emitted = {tool for tools in predicted for tool in tools}
    assert predicted and emitted, "round 1's evaluation predicted no tool at all"
    if offer_all:  # the control: with every row offered, the inflated later rows are emitted
        assert emitted & round_two
    else:
        assert emitted <= round_one, f"after round 1 decoding emitted unlearned tools {sorted(emitted - round_one)}"
