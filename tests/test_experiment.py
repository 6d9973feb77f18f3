"""The run directory's summary: which metrics it carries, absent parse-error rates, and the printed tables."""

from __future__ import annotations

import json

import pytest

from conftest import assert_forgetting_plot
from experiment import RunDirectory, format_summary_table, parse_training_rounds


def metrics(tool: float, call: float, rate: float | None, paper_tool: float, paper_call: float,
            paper_rate: float | None) -> dict:
    return {"avg_tool_f1_score": tool, "avg_f1_score": call, "exact_accuracy": call / 2, "tool_accuracy": tool / 2,
            "parse_error_rate": rate, "paper_avg_tool_f1_score": paper_tool, "paper_avg_f1_score": paper_call,
            "paper_exact_accuracy": paper_call / 2, "paper_parse_error_rate": paper_rate}


@pytest.fixture
def run(tmp_path) -> RunDirectory:
    run = RunDirectory(tmp_path / "run", "tokmem", {"seed": 1},
                       parse_training_rounds("1-2:1,3-4:1"), resume=False)
    run.add_metrics(0, 0, metrics(0.8, 0.6, 0.25, 1.0, 0.7, 0.5), "predicted")
    # after round 2, test set 1-2 got no predicted call at all: both parse-error rates are absent
    run.add_metrics(1, 0, metrics(0.4, 0.3, None, 0.5, 0.35, None), "predicted")
    run.add_metrics(1, 1, metrics(0.9, 0.8, 0.1, 0.95, 0.85, 0.3), "predicted")
    return run


def test_summary_carries_both_score_families_and_tolerates_absent_rates(run):
    summary = run.write_summary()
    assert summary == json.loads((run.path / "summary.json").read_text())
    for metric in ("paper_avg_tool_f1_score", "paper_avg_f1_score", "paper_exact_accuracy", "paper_parse_error_rate"):
        assert metric in summary["matrix"] and metric in summary["average_after_last"]
    assert summary["matrix"]["paper_avg_tool_f1_score"] == [[1.0, None], [0.5, 0.95]]
    assert summary["average_after_last"]["paper_avg_tool_f1_score"] == pytest.approx((0.5 + 0.95) / 2)
    assert summary["backward_transfer"]["paper_avg_tool_f1_score"] == pytest.approx(0.5 - 1.0)
    assert summary["average_after_last"]["paper_avg_f1_score"] == pytest.approx((0.35 + 0.85) / 2)
    # an absent rate is skipped by the average and leaves backward transfer undefined
    assert summary["matrix"]["parse_error_rate"] == [[0.25, None], [None, 0.1]]
    assert summary["average_after_last"]["parse_error_rate"] == pytest.approx(0.1)
    assert summary["average_after_last"]["paper_parse_error_rate"] == pytest.approx(0.3)
    assert summary["backward_transfer"]["parse_error_rate"] is None
    assert summary["backward_transfer"]["paper_parse_error_rate"] is None
    assert_forgetting_plot(run.path / "forgetting.png")


def test_summary_table_prints_the_paper_scoring_matrices(run):
    table = format_summary_table(run.summary()).splitlines()
    heading = next(i for i, line in enumerate(table) if line.startswith("paper_avg_tool_f1_score"))
    assert "paper scoring" in table[heading]
    assert table[heading + 2].split() == ["1-2", "1.000", "-"]
    assert table[heading + 3].split() == ["3-4", "0.500", "0.950"]
    assert table[heading + 4].split() == ["average", "after", "last", "round:", "0.725",
                                          "backward", "transfer:", "-0.500"]
    call = next(line for line in table if line.startswith("paper_avg_f1_score"))
    assert "paper scoring" in call


def test_summary_table_of_an_older_run_without_paper_metrics(run):
    summary = run.summary()
    for section in ("matrix", "average_after_last", "backward_transfer"):
        summary[section] = {k: v for k, v in summary[section].items() if not k.startswith("paper_")}
    table = format_summary_table(summary)
    assert "avg_tool_f1_score" in table and "paper" not in table
