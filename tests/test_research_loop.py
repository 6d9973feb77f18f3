"""A researcher's loop over one finished tiny TokMem run: every evaluation's predictions kept and re-scored by eval.py,
predict.py answering from the run directory, the training curve, the validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval as scoring
import main_sequential
from conftest import TrainingRecorder, kept_logging, run_in_process, write_round_files

ROUND_1 = ["get_weather", "convert_currency", "search_flights"]
ROUND_2 = ["calculate_bmi", "book_table", "translate_text"]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Two tiny TokMem rounds with every earlier test set scored, gold-tool decoding and the prototype loss."""
    root = tmp_path_factory.mktemp("research_loop")
    data = root / "data"
    write_round_files(data, 1, 3, ROUND_1, n_train=16)
    write_round_files(data, 4, 6, ROUND_2, n_train=16)
    out = root / "run"
    args = ["--model_name", str(tiny_model_dir), "--training_rounds", "1-3:2,4-6:1", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--eval_all_previous", "--max_new_tokens", "12",
            "--use_ground_truth_tools", "--prototype_weight", "0.5", "--prototype_samples", "8",
            "--save_checkpoints", "--device", "cpu"]
    run_in_process(main_sequential.main, args, TrainingRecorder())
    return out


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_evaluation_keeps_its_predictions_and_eval_rescores_them(finished_run, capsys):
    records = records_of(finished_run)
    # after round 1: its test set; after round 2: both; each predicted and with the gold tools; plus validation
    assert sorted({(r["round"], r["test_round"], r["mode"]) for r in records if r["mode"] != "validation"}) == [
        (0, 0, "ground_truth_tools"), (0, 0, "predicted"), (1, 0, "ground_truth_tools"), (1, 0, "predicted"),
        (1, 1, "ground_truth_tools"), (1, 1, "predicted")]
    for record in records:
        path = finished_run / record["predictions"]
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == record["metrics"]["total_examples"]
        assert {"user_input", "gold_tools", "gold_calls", "predicted_tools", "function_calls",
                "generated_text"} <= set(lines[0])
        # eval.py gives the run's numbers, both families, and the breakdown
        with kept_logging():
            with pytest.raises(SystemExit) as exit_info:
                scoring.run_cli(scoring.main, ["--predictions", str(path), "--output", str(path) + ".scores"])
        assert exit_info.value.code == 0
        assert json.loads(Path(str(path) + ".scores").read_text()) == record["metrics"]
        Path(str(path) + ".scores").unlink()
    assert (finished_run / "predictions" / "round_2_test_1-3.jsonl").is_file()
    assert "paper_avg_f1_score" in capsys.readouterr().out
