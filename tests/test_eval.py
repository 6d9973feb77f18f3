"""Scores of eval.py on hand-made cases: parsing, normalization, multiset matching and the metric dict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import eval as scoring
from common import UserError

REPO = Path(__file__).resolve().parent.parent


def prediction(predicted_tools, function_calls, gold_tools, gold_calls) -> dict:
    return {
        "predicted_tools": predicted_tools,
        "function_calls": function_calls,
        "gold_tools": gold_tools,
        "gold_calls": gold_calls,
    }


# ----------------------------------------------------------------------------------------------------------------------
# parse_function_call


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"city": "Paris", "days": 3}', {"city": "Paris", "days": 3}),
        ('  {"a": [1, {"b": null}]}\n', {"a": [1, {"b": None}]}),
        ('Sure! Here it is: {"city": "Paris"} Hope that helps {"x": 1}', {"city": "Paris"}),
        ('```json\n{"q": "it\'s {fine}"}\n```', {"q": "it's {fine}"}),
        ('get_weather(city="Paris", days=3, metric=true)', {"city": "Paris", "days": 3, "metric": True}),
        (
            "Calling search(query='cats', limit=5.0, tags=['a', 'b']) now",
            {"query": "cats", "limit": 5.0, "tags": ["a", "b"]},
        ),
        ("ping()", {}),
        ("{'unit': 'kg', 'n': 2}", {"unit": "kg", "n": 2}),
        ("Note (it's here): {\"a\": 1}", {"a": 1}),
        ("{}", {}),
    ],
)
def test_parse_function_call_accepts_json_embedded_json_and_keyword_calls(text, expected):
    assert scoring.parse_function_call(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "no call here",
        "[1, 2, 3]",
        '"just a string"',
        '{"city": "Paris", "opts": {"deep": 1}',  # truncated generation: the inner object is not the call
        "f(1, 2)",  # positional arguments cannot be named
        "f(x=some_variable)",
        "{not json at all}",
        None,
        42,
    ],
)
def test_parse_function_call_returns_none_when_unparseable(text):
    assert scoring.parse_function_call(text) is None


def test_parse_function_call_returns_a_dict_unchanged():
    call = {"a": 1}
    assert scoring.parse_function_call(call) is call


# ----------------------------------------------------------------------------------------------------------------------
# normalize_call


def test_normalize_call_ignores_key_order_whitespace_and_float_form_of_integers():
    a = scoring.normalize_call('{"b": 3.0, "a": {"y": [1.0, 2.5], "x": "  hi "}}')
    b = scoring.normalize_call({"a": {"x": "hi", "y": [1, 2.5]}, "b": 3})
    assert a == b == '{"a":{"x":"hi","y":[1,2.5]},"b":3}'


def test_normalize_call_keeps_types_apart():
    assert scoring.normalize_call('{"n": "3"}') != scoring.normalize_call('{"n": 3}')
    assert scoring.normalize_call('{"n": true}') != scoring.normalize_call('{"n": 1}')
    assert scoring.normalize_call('{"n": 2.5}') != scoring.normalize_call('{"n": 2}')


def test_normalize_call_is_none_for_unparseable_input():
    assert scoring.normalize_call("the model rambled") is None
    assert scoring.normalize_call(["not", "a", "call"]) is None


# ----------------------------------------------------------------------------------------------------------------------
# calculate_f1_score


def test_calculate_f1_score_counts_duplicates():
    scores = scoring.calculate_f1_score(["a", "a", "b"], ["a", "b", "b"])
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1_score"] == pytest.approx(2 / 3)


def test_calculate_f1_score_conventions_for_empty_sides():
    assert scoring.calculate_f1_score([], []) == {"f1_score": 1.0, "precision": 1.0, "recall": 1.0}
    assert scoring.calculate_f1_score([], ["a"]) == {"f1_score": 0.0, "precision": 0.0, "recall": 0.0}
    assert scoring.calculate_f1_score(["a"], []) == {"f1_score": 0.0, "precision": 0.0, "recall": 0.0}


# ----------------------------------------------------------------------------------------------------------------------
# score_predictions


def test_score_predictions_overall_and_breakdown_numbers():
    predictions = [
        # perfect single call, written differently
        prediction(["weather"], ['{"days": 3.0, "city": " Paris"}'], ["weather"], ['{"city": "Paris", "days": 3}']),
        # right tool, wrong argument
        prediction(["weather"], ['{"city": "Rome"}'], ["weather"], ['{"city": "Paris"}']),
        # two gold calls, same arguments on different tools; one predicted call names the wrong tool
        prediction(["a", "c"], ['{"x": 1}', '{"x": 1}'], ["a", "b"], ['{"x": 1}', '{"x": 1}']),
        # two gold calls, the model repeated one call and one is unparseable
        prediction(["a", "a", "b"], ['{"x": 1}', '{"x": 1}', "oops"], ["a", "b"], ['{"x": 1}', '{"y": 2}']),
    ]
    metrics = scoring.score_predictions(predictions)
    assert metrics["total_examples"] == 4
    assert metrics["exact_accuracy"] == pytest.approx(1 / 4)
    assert metrics["tool_accuracy"] == pytest.approx(2 / 4)
    # call precision per sample: 1, 0, 1/2, 1/3; recall: 1, 0, 1/2, 1/2
    assert metrics["avg_precision"] == pytest.approx((1 + 0 + 1 / 2 + 1 / 3) / 4)
    assert metrics["avg_recall"] == pytest.approx((1 + 0 + 1 / 2 + 1 / 2) / 4)
    assert metrics["avg_f1_score"] == pytest.approx((1 + 0 + 1 / 2 + 0.4) / 4)
    # tool precision per sample: 1, 1, 1/2, 2/3; recall: 1, 1, 1/2, 1
    assert metrics["avg_tool_precision"] == pytest.approx((1 + 1 + 1 / 2 + 2 / 3) / 4)
    assert metrics["avg_tool_recall"] == pytest.approx((1 + 1 + 1 / 2 + 1) / 4)
    assert metrics["avg_tool_f1_score"] == pytest.approx((1 + 1 + 1 / 2 + 0.8) / 4)
    assert metrics["parse_error_rate"] == pytest.approx(1 / 7)

    breakdown = metrics["call_count_breakdown"]
    assert list(breakdown) == ["1", "2"]
    assert breakdown["1"]["total_examples"] == 2
    assert breakdown["1"]["exact_accuracy"] == pytest.approx(0.5)
    assert breakdown["1"]["tool_accuracy"] == pytest.approx(1.0)
    assert breakdown["1"]["parse_error_rate"] == 0.0
    assert breakdown["2"]["total_examples"] == 2
    assert breakdown["2"]["exact_accuracy"] == 0.0
    assert breakdown["2"]["avg_f1_score"] == pytest.approx((0.5 + 0.4) / 2)
    assert breakdown["2"]["parse_error_rate"] == pytest.approx(1 / 5)

    # the original's rules on the same predictions: 3.0 != 3 and " Paris" != "Paris" (sample 1 misses), the tool is
    # not part of a call (sample 3 matches fully), sets (sample 4: {x1, oops} vs {x1, y2})
    assert metrics["paper_exact_accuracy"] == pytest.approx((0 + 0 + 1 + 0) / 4)
    assert metrics["paper_avg_f1_score"] == pytest.approx((0 + 0 + 1 + 1 / 2) / 4)
    assert metrics["paper_avg_precision"] == pytest.approx((0 + 0 + 1 + 1 / 2) / 4)
    assert metrics["paper_avg_recall"] == pytest.approx((0 + 0 + 1 + 1 / 2) / 4)
    # tool sets: {weather}, {weather}, {a, c} vs {a, b}, {a, b} vs {a, b}
    assert metrics["paper_avg_tool_f1_score"] == pytest.approx((1 + 1 + 1 / 2 + 1) / 4)
    assert metrics["paper_avg_tool_precision"] == pytest.approx((1 + 1 + 1 / 2 + 1) / 4)
    assert metrics["paper_avg_tool_recall"] == pytest.approx((1 + 1 + 1 / 2 + 1) / 4)
    assert metrics["paper_parse_error_rate"] == pytest.approx(1 / 4)  # one unparseable call, four samples
    assert breakdown["1"]["paper_parse_error_rate"] == 0.0
    assert breakdown["2"]["paper_parse_error_rate"] == pytest.approx(1 / 2)
    assert breakdown["2"]["paper_exact_accuracy"] == pytest.approx(1 / 2)


def test_score_predictions_counts_repeated_tools_and_calls_as_a_multiset():
    # Under set matching both samples would be perfect; as multisets one call is missing and one is extra.
    metrics = scoring.score_predictions([
        prediction(["a"], ['{"x": 1}'], ["a", "a"], ['{"x": 1}', '{"x": 1}']),
        prediction(["b", "b"], ['{"y": 2}', '{"y": 2}'], ["b"], ['{"y": 2}']),
    ])
    assert metrics["tool_accuracy"] == 0.0 and metrics["exact_accuracy"] == 0.0
    for kind in ("avg_tool_", "avg_"):
        assert metrics[f"{kind}precision"] == pytest.approx((1 + 1 / 2) / 2)
        assert metrics[f"{kind}recall"] == pytest.approx((1 / 2 + 1) / 2)
        assert metrics[f"{kind}f1_score"] == pytest.approx(2 / 3)


def test_score_predictions_has_every_metric_name_of_the_design():
    metrics = scoring.score_predictions([prediction([], [], ["t"], ['{"a": 1}'])])
    ours = {
        "exact_accuracy", "tool_accuracy", "avg_f1_score", "avg_precision", "avg_recall", "avg_tool_f1_score",
        "avg_tool_precision", "avg_tool_recall", "parse_error_rate",
    }
    paper = {
        "paper_exact_accuracy", "paper_avg_f1_score", "paper_avg_precision", "paper_avg_recall",
        "paper_avg_tool_f1_score", "paper_avg_tool_precision", "paper_avg_tool_recall", "paper_parse_error_rate",
    }
    expected = ours | paper | {"total_examples", "call_count_breakdown"}
    assert set(metrics) == expected
    assert set(metrics["call_count_breakdown"]["1"]) == expected - {"call_count_breakdown"}
    # empty prediction: every score 0; with no predicted call our parse-error rate is absent, not perfect, and the
    # paper's is 0 errors over the samples, as the original reports it
    assert metrics["avg_f1_score"] == 0.0 and metrics["avg_tool_precision"] == 0.0
    assert metrics["paper_avg_f1_score"] == 0.0 and metrics["paper_avg_tool_precision"] == 0.0
    assert metrics["parse_error_rate"] is None and metrics["paper_parse_error_rate"] == 0.0
    assert metrics["call_count_breakdown"]["1"]["parse_error_rate"] is None


def test_score_predictions_tool_without_call_is_an_unparseable_call():
    metrics = scoring.score_predictions([prediction(["t", "u"], ['{"a": 1}'], ["t"], ['{"a": 1}'])])
    assert metrics["parse_error_rate"] == pytest.approx(0.5)
    assert metrics["avg_precision"] == pytest.approx(0.5)
    assert metrics["avg_recall"] == 1.0


@pytest.mark.parametrize(
    "predictions, message",
    [
        ([], "no predictions"),
        ([{"predicted_tools": [], "function_calls": [], "gold_tools": []}], "prediction 0: missing field 'gold_calls'"),
        ([prediction([], [], ["t"], [])], "'gold_tools' has 1 entries but 'gold_calls' has 0"),
        ([prediction("t", [], [], [])], "field 'predicted_tools' must be a list"),
        ([prediction([], [], ["t"], ["nonsense"])], "prediction 0, gold call 0"),
        ([prediction([1], ["{}"], [], [])], "'predicted_tools' must hold tool names"),
        (["not an object"], "prediction 0: expected an object"),
    ],
)
def test_score_predictions_rejects_bad_input_with_a_clear_message(predictions, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        scoring.score_predictions(predictions)


def test_format_metrics_table_shows_overall_and_breakdown():
    metrics = scoring.score_predictions(
        [
            prediction(["t"], ['{"a": 1}'], ["t"], ['{"a": 1}']),
            prediction(["t"], ['{"a": 1}'], ["t", "u"], ['{"a": 1}', '{"b": 2}']),
        ]
    )
    table = scoring.format_metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "overall", "1", "call", "2", "calls"]
    exact_row = next(line for line in lines if line.startswith("exact_accuracy"))
    assert exact_row.split()[1:] == ["0.5000", "1.0000", "0.0000"]
    total_row = next(line for line in lines if line.startswith("total_examples"))
    assert total_row.split()[1:] == ["2", "1", "1"]


# ----------------------------------------------------------------------------------------------------------------------
# paper_ metrics: worked examples of the original scoring rules (docs/reference.md, "Scores"), values computed by hand


def test_paper_tool_f1_counts_a_repeated_gold_tool_once():
    metrics = scoring.score_predictions([prediction(
        ["A", "B"], ['{"x": 1}', '{"y": 1}'],
        ["A", "A", "B"], ['{"x": 1}', '{"x": 2}', '{"y": 1}'],
    )])
    # sets {A, B} vs {A, B}
    assert metrics["paper_avg_tool_f1_score"] == 1.0
    assert metrics["paper_avg_tool_recall"] == 1.0
    # multisets: 2 of 2 predicted are right (P 1), 2 of 3 gold are found (R 2/3), F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert metrics["avg_tool_precision"] == 1.0
    assert metrics["avg_tool_recall"] == pytest.approx(2 / 3)
    assert metrics["avg_tool_f1_score"] == pytest.approx(0.8)


def test_paper_call_f1_counts_a_duplicated_correct_call_once():
    metrics = scoring.score_predictions([prediction(["A", "A"], ['{"x": 1}', '{"x": 1}'], ["A"], ['{"x": 1}'])])
    assert metrics["paper_avg_f1_score"] == 1.0  # {x=1} vs {x=1}
    assert metrics["paper_avg_precision"] == 1.0
    assert metrics["paper_exact_accuracy"] == 0.0  # exact match compares sorted lists: two calls vs one
    # multiset: P 1/2, R 1, F1 = 2 * 1/2 / (3/2) = 2/3
    assert metrics["avg_precision"] == pytest.approx(0.5)
    assert metrics["avg_f1_score"] == pytest.approx(2 / 3)


def test_paper_call_f1_ignores_the_tool_of_a_call():
    metrics = scoring.score_predictions([prediction(
        ["A", "B", "D"], ['{"x": 1}', '{"y": 2}', '{"z": 3}'],
        ["A", "B", "C"], ['{"x": 1}', '{"y": 2}', '{"z": 3}'],
    )])
    assert metrics["paper_avg_f1_score"] == 1.0
    assert metrics["paper_exact_accuracy"] == 1.0
    # tool-aware: 2 of 3 calls match on both sides
    assert metrics["avg_f1_score"] == pytest.approx(2 / 3)
    assert metrics["exact_accuracy"] == 0.0
    # the tool scores see the wrong tool in both families: sets {A, B, D} vs {A, B, C}
    assert metrics["paper_avg_tool_f1_score"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("predicted, gold, paper_f1, ours_f1", [
    ('{"n": 3.0}', '{"n": 3}', 0.0, 1.0),  # no number canonicalisation
    ('{"city": " Paris"}', '{"city": "Paris"}', 0.0, 1.0),  # string values are not stripped
    ('{ "b": 1,\n "a": [2, 3] }', '{"a": [2, 3], "b": 1}', 1.0, 1.0),  # parsed JSON: key order and layout do not count
    ('Sure: {"a": 1} done', '{"a": 1}', 1.0, 1.0),  # the JSON between the first { and the last }
    ('get(a=1)', '{"a": 1}', 0.0, 1.0),  # a call form parses, but never matches a plain arguments object
])
def test_paper_call_identity(predicted, gold, paper_f1, ours_f1):
    metrics = scoring.score_predictions([prediction(["t"], [predicted], ["t"], [gold])])
    assert metrics["paper_avg_f1_score"] == paper_f1
    assert metrics["avg_f1_score"] == ours_f1
    assert metrics["paper_parse_error_rate"] == 0.0


@pytest.mark.parametrize("text", ["", "   ", "oops", 'a {"x": 1} b {"y": 2}', "f(", None])
def test_paper_call_parse_errors(text):
    assert scoring.paper_call(text).parse_error


# The original's scorer (compositional/eval.py, compare_function_calls_advanced), run on these inputs on 2026-12-06:
# (predicted calls, gold calls) -> (f1, precision, recall, exact, parse errors) as it returned them.
ORIGINAL_SCORES = [
    # valid JSON that is no object is compared as its JSON, not a parse error
    (['": "'], ['{"a": 1}'], (0.0, 0.0, 0.0, 0.0, 0)),
    (["[1, 2]"], ['{"a": 1}'], (0.0, 0.0, 0.0, 0.0, 0)),
    # call-form text goes through the AST: spacing does not count, and it can match a one-key object of an object
    (["f(a=1)", "f(a = 1)"], ['{"f": {"a": 1}}'], (1.0, 1.0, 1.0, 0.0, 0)),
    (["filters(min=1, max=9)"], ['{"filters": {"min": 1, "max": 9}}'], (1.0, 1.0, 1.0, 1.0, 0)),
    # a one-key object of an object keeps the key order of the values inside it
    (['{"a": {"b": {"y": 1, "x": 2}}}'], ['{"a": {"b": {"x": 2, "y": 1}}}'], (0.0, 0.0, 0.0, 0.0, 0)),
    (['{"a": {"y": 1, "x": 2}}'], ['{"a": {"x": 2, "y": 1}}'], (1.0, 1.0, 1.0, 1.0, 0)),
    # a dict with a parse_error key is a parse error; one with only raw_text is compared as that text, uncounted
    (['{"parse_error": 1}'], ['{"a": 1}'], (0.0, 0.0, 0.0, 0.0, 1)),
    (['{"raw_text": "x  y"}', "x y"], ['{"a": 1}'], (0.0, 0.0, 0.0, 0.0, 1)),
    # raw text whose collapsed whitespace is a gold call's JSON matches it
    (['{"a":"x\ny"}'], ['{"a": "x y"}'], (1.0, 1.0, 1.0, 1.0, 1)),
]


@pytest.mark.parametrize("predicted, gold, expected", ORIGINAL_SCORES)
def test_paper_scores_equal_the_original_scorer(predicted, gold, expected):
    metrics = scoring.score_predictions([prediction(["t"] * len(predicted), predicted, ["t"] * len(gold), gold)])
    got = tuple(metrics[name] for name in ("paper_avg_f1_score", "paper_avg_precision", "paper_avg_recall",
                                           "paper_exact_accuracy", "paper_parse_error_rate"))
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("text", ["3", "null", "true", "[1]", '"a"', '"a parse_error"', '["raw_text", 1]'])
def test_inputs_that_crash_the_original_are_parse_errors_here(text):
    # The original's scorer raises on these, then scores the rest of its batch of 16 as 0 (its bug, not reproduced).
    call = scoring.paper_call(text)
    assert call.crashes_original and call.parse_error
    metrics = scoring.score_predictions([prediction(["t"], [text], ["t"], ['{"a": 1}'])])
    assert metrics["paper_parse_error_rate"] == 1.0 and metrics["paper_avg_f1_score"] == 0.0


def test_paper_scores_an_answer_without_tool_token_as_one_call_of_its_text():
    untooled = {**prediction([], [], ["t"], ['{"a": 1}']), "untooled_text": '{"a": 1}'}
    metrics = scoring.score_predictions([untooled])
    assert metrics["paper_avg_f1_score"] == 1.0 and metrics["paper_avg_tool_f1_score"] == 0.0
    assert metrics["avg_f1_score"] == 0.0  # ours: no tool token, no call


def test_paper_unparseable_calls_collapse_in_the_set_but_count_each_as_an_error():
    metrics = scoring.score_predictions([prediction(
        ["t", "t", "t"], ['{"x": 1}', "oops", " oops "], ["t"], ['{"x": 1}'],
    )])
    # paper: set {x1, "oops"} vs {x1}: P 1/2, R 1, F1 2/3; two unparseable calls over one sample
    assert metrics["paper_avg_precision"] == pytest.approx(0.5)
    assert metrics["paper_avg_f1_score"] == pytest.approx(2 / 3)
    assert metrics["paper_parse_error_rate"] == 2.0
    # multiset: P 1/3, R 1, F1 1/2; two unparseable calls over three predicted calls
    assert metrics["avg_precision"] == pytest.approx(1 / 3)
    assert metrics["avg_f1_score"] == pytest.approx(0.5)
    assert metrics["parse_error_rate"] == pytest.approx(2 / 3)


def test_empty_prediction_for_empty_gold_scores_one_in_both_families():
    metrics = scoring.score_predictions([prediction([], [], [], [])])
    for name in ("avg_f1_score", "avg_precision", "avg_recall", "avg_tool_f1_score", "exact_accuracy"):
        assert metrics[name] == 1.0
        assert metrics["paper_" + name] == 1.0
    assert metrics["parse_error_rate"] is None and metrics["paper_parse_error_rate"] == 0.0  # the original: 0 / 1


def test_parse_error_denominators_and_absent_groups():
    metrics = scoring.score_predictions([
        # 1 gold call; 3 predicted calls, 2 unparseable (one empty)
        prediction(["A", "B", "C"], ['{"x": 1}', "oops", ""], ["A"], ['{"x": 1}']),
        # 2 gold calls; 1 predicted call, parseable
        prediction(["A"], ['{"x": 1}'], ["A", "B"], ['{"x": 1}', '{"y": 2}']),
        # 3 gold calls; nothing predicted
        prediction([], [], ["A", "B", "C"], ['{"x": 1}', '{"y": 2}', '{"z": 3}']),
    ])
    assert metrics["parse_error_rate"] == pytest.approx(2 / 4)  # over predicted calls: 3 + 1 + 0
    assert metrics["paper_parse_error_rate"] == pytest.approx(2 / 3)  # over samples
    breakdown = metrics["call_count_breakdown"]
    assert breakdown["1"]["parse_error_rate"] == pytest.approx(2 / 3)
    assert breakdown["1"]["paper_parse_error_rate"] == 2.0  # over samples it can exceed 1
    assert breakdown["2"]["parse_error_rate"] == 0.0 and breakdown["2"]["paper_parse_error_rate"] == 0.0
    assert breakdown["3"]["parse_error_rate"] is None and breakdown["3"]["paper_parse_error_rate"] == 0.0
    table = scoring.format_metrics_table(metrics).splitlines()
    assert next(line for line in table if line.startswith("parse_error_rate")).split()[1:] == [
        "0.5000", "0.6667", "0.0000", "n/a"]
    assert any(line.startswith("paper scoring") for line in table)
    assert next(line for line in table if line.startswith("paper_parse_error_rate")).split()[1:] == [
        "0.6667", "2.0000", "0.0000", "0.0000"]


# ----------------------------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_scores_a_file_and_reports_bad_input_in_one_line(tmp_path):
    predictions = [prediction(["t"], ['{"a": 1.0}'], ["t"], ['{"a": 1}'])]
    preds_file = tmp_path / "preds.json"
    preds_file.write_text(json.dumps(predictions))
    out_file = tmp_path / "metrics.json"
    ok = subprocess.run(
        [sys.executable, "eval.py", "--predictions", str(preds_file), "--output", str(out_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "exact_accuracy" in ok.stdout
    assert json.loads(out_file.read_text())["exact_accuracy"] == 1.0

    preds_file.write_text(json.dumps([prediction(["t"], ["{}"], ["t"], [])]))
    bad = subprocess.run(
        [sys.executable, "eval.py", "--predictions", str(preds_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "prediction 0" in bad.stderr and str(preds_file) in bad.stderr


def test_cli_refuses_predicted_fields_of_different_lengths_as_it_does_gold_ones(tmp_path, capsys):
    from common import UserError

    preds_file = tmp_path / "preds.json"
    preds_file.write_text(json.dumps([prediction(["t"], ['{"a": 1}'], ["t"], ['{"a": 1}']),
                                      prediction(["t", "u"], ['{"a": 1}'], ["t"], ['{"a": 1}'])]))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError) as error:
        scoring.main(["--predictions", str(preds_file), "--output", str(tmp_path / "metrics.json")])
    assert str(error.value) == (f"predictions file {preds_file}: prediction 1: 'predicted_tools' has 2 entries but "
                                "'function_calls' has 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # A model's own answer cut off after a tool still scores, the missing call as an unparseable one.
    assert scoring.score_predictions([prediction(["t", "u"], ['{"a": 1}'], ["t"], ['{"a": 1}'])])["parse_error_rate"]
