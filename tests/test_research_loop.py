"""A researcher's loop over one finished tiny TokMem run: every evaluation's predictions kept and re-scored by eval.py,
predict.py answering from the run directory, the training curve, the validation split."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import eval as scoring
import main_sequential
import predict
from common import UserError
from conftest import REPO_ROOT, TrainingRecorder, kept_logging, run_in_process, write_round_files

ROUND_1 = ["get_weather", "convert_currency", "search_flights"]
ROUND_2 = ["calculate_bmi", "book_table", "translate_text"]


# tensorboard is an optional requirement (requirements-optional.txt, which .ci/run installs)
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


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
            "--validation_split", "0.25", "--save_checkpoints", "--device", "cpu"]
    if HAS_TENSORBOARD:
        args += ["--report_to", "tensorboard"]
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


def run_predict(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "predict.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)


@pytest.mark.slow
def test_predict_answers_from_a_run_directory_as_the_run_decoded(finished_run):
    test_set = json.loads(next((finished_run.parent / "data" / "test").glob("*4-6*")).read_text())
    queries = [sample["user_input"] for sample in test_set[:2]]
    result = run_predict([str(finished_run), *queries, "--batch_size", "1"])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == queries
    # the last round's checkpoint decodes as the run's own evaluation did (same prompts, rules and memory)
    kept = [json.loads(line) for line in (finished_run / "predictions" / "round_2_test_4-6.jsonl").read_text()
            .splitlines()]
    by_query = {p["user_input"]: p for p in kept}
    for line in lines:
        assert line["text"] == by_query[line["query"]]["generated_text"]
        assert [c["name"] for c in line["calls"]] == by_query[line["query"]]["predicted_tools"]
    # --round 1 offers round 1's tools only; --tools narrows further; stdin gives the queries
    result = run_predict([str(finished_run), "--round", "1", "--tools", "get_weather"], stdin=queries[0] + "\n")
    assert result.returncode == 0, result.stderr
    assert {c["name"] for c in json.loads(result.stdout)["calls"]} <= {"get_weather"}


@pytest.mark.slow
def test_training_curve_per_optimizer_step_and_tensorboard(finished_run):
    curve = [json.loads(line) for line in (finished_run / "training_curve.jsonl").read_text().splitlines()]
    stats = json.loads((finished_run / "summary.json").read_text())["round_stats"]
    assert [sum(p["round"] == r for p in curve) for r in (0, 1)] == [s["steps"] for s in stats]
    assert [p["global_step"] for p in curve] == list(range(1, len(curve) + 1))
    for point in curve:
        assert point["grad_norm"] > 0 and point["lr"] > 0
        weight = 0.5 if point["round"] == 1 else 0.0
        assert point["loss"] == pytest.approx(point["data_loss"] + weight * (point["prototype_loss"] or 0.0))
    # the prototype loss is on from round 2 only; a round's last steps give its reported final loss
    assert all(p["prototype_loss"] is None for p in curve if p["round"] == 0)
    assert all(p["prototype_loss"] > 0 for p in curve if p["round"] == 1)
    assert curve[-1]["lr"] < curve[0]["lr"] or curve[-1]["round"] != curve[0]["round"]
    assert (finished_run / "training_curve.png").stat().st_size > 10_000
    if not HAS_TENSORBOARD:
        pytest.skip("tensorboard is not installed (pip install -r requirements-optional.txt)")
    events = list((finished_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "--report_to tensorboard writes event files"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    assert losses == pytest.approx([p["loss"] for p in curve], rel=1e-6)


def test_report_to_tensorboard_without_the_package_is_one_line(monkeypatch, tmp_path):
    from sequential import check_output_flags
    from settings import OutputSettings

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="--report_to tensorboard needs the tensorboard package"):
        check_output_flags(OutputSettings(output_dir=str(tmp_path / "run"), report_to="tensorboard"))


@pytest.mark.slow
def test_predict_refusals_are_one_line(finished_run, tmp_path):
    icl = tmp_path / "icl"
    icl.mkdir()
    (icl / "config.json").write_text(json.dumps({"method": "icl", "args": {}}))
    other = tmp_path / "other_backbone"
    shutil.copytree(json.loads((finished_run / "config.json").read_text())["inputs"]["model_name"], other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    for args, message in [
        ([str(icl), "q"], "is a icl run; predict.py answers with a TokMem or LoRA-baseline run"),
        ([str(finished_run), "q", "--round", "3"], "finished 2 round(s)"),
        ([str(finished_run), "q", "--model_name", str(other)], "is not the one the run trained on"),
        ([str(finished_run), "q", "--tools", "nope"], "--tools: nope: not among the run's tools"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            predict.main(args)
    shutil.rmtree(finished_run / "checkpoints" / "round_1")
    with pytest.raises(UserError, match=r"checkpoint .*round_1 is missing"):
        predict.main([str(finished_run), "q", "--round", "1"])


@pytest.mark.slow
def test_validation_split_holds_out_training_samples_and_scores_them(finished_run):
    data = finished_run.parent / "data"
    records = [r for r in records_of(finished_run) if r["mode"] == "validation"]
    assert sorted((r["round"], r["test_round"]) for r in records) == [(0, 0), (1, 0), (1, 1)]
    for record in records:
        held = [json.loads(line)["user_input"] for line in (finished_run / record["predictions"]).read_text()
                .splitlines()]
        train = json.loads(next((data / "training").glob(f"*{record['test_name']}*")).read_text())
        test = json.loads(next((data / "test").glob(f"*{record['test_name']}*")).read_text())
        assert len(held) == 4 and set(held) <= {s["user_input"] for s in train}  # 0.25 x 16
        assert not set(held) & {s["user_input"] for s in test}
        assert record["loss"] > 0
    summary = json.loads((finished_run / "summary.json").read_text())
    validation = summary["validation"]
    assert validation["matrix"]["loss"][1][0] == next(r["loss"] for r in records if r["round"] == 1
                                                      and r["test_round"] == 0)
    assert validation["matrix"]["avg_f1_score"][0][1] is None
    # the held-out samples are never trained on: 12 of 16 per round, batch 4, 2 epochs then 1
    assert [s["steps"] for s in summary["round_stats"]] == [6, 3]


@pytest.mark.slow
def test_single_split_in_the_working_directory_and_predict_with_the_lora_baseline(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    import lora_sequential

    write_round_files(tmp_path, 1, 3, ["search_flights", "get_weather", "convert_currency"], n_train=6, n_test=2)
    (tmp_path / "function_calling_train.json").write_text(next((tmp_path / "training").glob("*.json")).read_text())
    (tmp_path / "function_calling_test.json").write_text(next((tmp_path / "test").glob("*.json")).read_text())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "lora_run"
    args = ["--model_name", str(tiny_model_dir), "--output_dir", str(out), "--batch_size", "3", "--epochs", "2",
            "--max_new_tokens", "8", "--device", "cpu"]
    summary = run_in_process(lora_sequential.main, args, TrainingRecorder())
    assert summary["rounds"] == ["1-3"] and summary["round_stats"][0]["steps"] == 4  # 6 samples / 3 x 2 epochs
    markers = json.loads((out / "checkpoints" / "round_1" / "markers.json").read_text())
    assert markers["tool_names"] == ["search_flights", "get_weather", "convert_currency"]  # first appearance
    kept = json.loads((out / "predictions" / "round_1_test_1-3.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    with kept_logging():
        assert predict.main([str(out), kept["user_input"]]) == 0
    answered = json.loads(capsys.readouterr().out)
    assert answered["text"] == kept["generated_text"]
    assert [c["name"] for c in answered["calls"]] == kept["predicted_tools"]
    (tmp_path / "function_calling_test.json").unlink()
    with pytest.raises(UserError, match="--test_data function_calling_test.json not found"):
        lora_sequential.main(args[:2] + ["--output_dir", str(tmp_path / "again")])
    with pytest.raises(UserError, match="exclude each other"):
        lora_sequential.main(["--training_rounds", "1-3:1", "--train_data", "x.json"])
