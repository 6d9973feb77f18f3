"""In-context baselines: answer parsing, tool inference, chat-template prompts, and tiny ICL/RAG runs through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import icl_baseline
from common import UserError
from conftest import TOOL_NAMES, write_round_files
from dataset import build_prompt_ids, icl_answer_text
from eval import score_predictions

REPO_ROOT = Path(__file__).resolve().parent.parent

DESCRIPTIONS = {
    "get_weather": {"name": "get_weather", "description": "Weather forecast for a city.",
                    "parameters": {"city": {"type": "str"}, "date": {"type": "str"}}},
    "convert_currency": {"name": "convert_currency", "description": "Convert money between currencies.",
                         "parameters": {"amount": {"type": "float"}, "from_currency": {"type": "str"},
                                        "to_currency": {"type": "str"}}},
    "search_flights": {"name": "search_flights", "description": "Find flights between two cities.",
                       "parameters": {"type": "object", "properties": {"origin": {"type": "string"},
                                                                       "destination": {"type": "string"},
                                                                       "date": {"type": "string"}}}},
}


# ----------------------------------------------------------------------------------------------------------------------
# Tool inference


def test_infer_tool_takes_a_known_name():
    call = {"name": "convert_currency", "arguments": {"city": "Paris"}}
    assert icl_baseline.infer_tool(call, DESCRIPTIONS) == "convert_currency"


def test_infer_tool_without_a_name_matches_argument_keys():
    assert icl_baseline.infer_tool({"arguments": {"city": "Paris"}}, DESCRIPTIONS) == "get_weather"
    assert icl_baseline.infer_tool({"amount": 3, "to_currency": "EUR"}, DESCRIPTIONS) == "convert_currency"
    call = {"arguments": {"origin": "Berlin", "destination": "Rome", "date": "2024-06-10"}}
    assert icl_baseline.infer_tool(call, DESCRIPTIONS) == "search_flights"


def test_infer_tool_with_an_unknown_name_falls_back_to_the_keys():
    call = {"name": "get_wether", "arguments": {"city": "Paris", "date": "2024-05-01"}}
    assert icl_baseline.infer_tool(call, DESCRIPTIONS) == "get_weather"


def test_infer_tool_gives_none_for_ties_and_no_match():
    twins = {"a": {"parameters": {"x": {}, "y": {}}}, "b": {"parameters": {"x": {}, "z": {}}}}
    assert icl_baseline.infer_tool({"arguments": {"x": 1}}, twins) is None
    assert icl_baseline.infer_tool({"arguments": {"x": 1, "z": 2}}, twins) == "b"
    assert icl_baseline.infer_tool({"name": "x", "arguments": {"colour": "red"}}, DESCRIPTIONS) is None
    assert icl_baseline.infer_tool({"name": "x", "arguments": {}}, DESCRIPTIONS) is None
    assert icl_baseline.infer_tool({"name": "x", "arguments": "not json"}, DESCRIPTIONS) is None


def test_call_arguments_forms():
    assert icl_baseline.call_arguments({"name": "get_weather", "arguments": '{"city": "Rome"}'}, DESCRIPTIONS) == {
        "city": "Rome"}
    assert icl_baseline.call_arguments({"name": "get_weather", "parameters": {"city": "Rome"}}, DESCRIPTIONS) == {
        "city": "Rome"}
    assert icl_baseline.call_arguments({"name": "get_weather", "city": "Rome"}, DESCRIPTIONS) == {"city": "Rome"}
    assert icl_baseline.call_arguments({"name": "Bob", "age": 3}, DESCRIPTIONS) == {"name": "Bob", "age": 3}
    assert icl_baseline.call_arguments({"name": "get_weather", "arguments": [1]}, DESCRIPTIONS) is None


# ----------------------------------------------------------------------------------------------------------------------
# Parsing answers


def test_parse_multi_line_answer():
    text = ('{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '\n'
            '{"name": "convert_currency", "arguments": {"amount": 5, "from_currency": "USD", "to_currency": "EUR"}}')
    calls = icl_baseline.parse_answer(text)
    assert [c["name"] for c in calls] == ["get_weather", "convert_currency"]


def test_parse_answer_variants():
    same_line = '{"name": "a", "arguments": {"x": [1, 2]}} {"name": "b", "arguments": {}}'
    assert [c["name"] for c in icl_baseline.parse_answer(same_line)] == ["a", "b"]
    pretty = 'Sure:\n```json\n{\n  "name": "a",\n  "arguments": {"x": 1}\n}\n```'
    assert icl_baseline.parse_answer(pretty) == [{"name": "a", "arguments": {"x": 1}}]
    listed = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]'
    assert [c["name"] for c in icl_baseline.parse_answer(listed)] == ["a", "b"]
    python_literal = "{'name': 'a', 'arguments': {'x': True}}"
    assert icl_baseline.parse_answer(python_literal) == [{"name": "a", "arguments": {"x": True}}]
    assert icl_baseline.parse_answer("I cannot help [sorry].") == []


def test_truncated_call_is_one_unparseable_call():
    text = '{"name": "a", "arguments": {"x": 1}}\n{"name": "b", "arguments": {"y": '
    calls = icl_baseline.parse_answer(text)
    assert calls[0] == {"name": "a", "arguments": {"x": 1}}
    assert isinstance(calls[1], str) and calls[1].startswith('{"name": "b"')


def test_gold_answer_text_scores_perfectly():
    tools = ["get_weather", "convert_currency", "get_weather"]
    calls = ['{"city": "Paris"}', '{"amount": 5.0, "from_currency": "USD", "to_currency": "EUR"}', '{"city": "Rome"}']
    predicted_tools, predicted_calls = icl_baseline.answer_to_calls(icl_answer_text(tools, calls), DESCRIPTIONS)
    assert predicted_tools == tools
    metrics = score_predictions([{"predicted_tools": predicted_tools, "function_calls": predicted_calls,
                                  "gold_tools": tools, "gold_calls": calls}])
    assert metrics["exact_accuracy"] == 1.0 and metrics["parse_error_rate"] == 0.0


def test_unparseable_and_unknown_calls_are_marked():
    tools, calls = icl_baseline.answer_to_calls('{"name": "nope", "arguments": {"q": 1}}\n{"name": "a", "argu',
                                                DESCRIPTIONS)
    assert tools == [icl_baseline.UNKNOWN_TOOL, icl_baseline.UNKNOWN_TOOL]
    assert json.loads(calls[0]) == {"q": 1}
    metrics = score_predictions([{"predicted_tools": tools, "function_calls": calls, "gold_tools": ["get_weather"],
                                  "gold_calls": ['{"city": "Paris"}']}])
    assert metrics["parse_error_rate"] == 0.5
    assert metrics["paper_parse_error_rate"] == 1.0  # the original's rate: one unparseable call over one sample


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def test_prompt_goes_through_the_chat_template(tiny_tokenizer):
    listing = list(DESCRIPTIONS.values())
    ids = icl_baseline.icl_prompt_ids(tiny_tokenizer, "Weather in Paris?", listing)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    system = text.split("<|eot_id|>")[0]
    for desc in listing:
        assert json.dumps(desc, separators=(",", ":")) in system
    assert "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


ORIGINAL_LISTING = [
    {"name": "get_weather", "description": "Wetter für eine Stadt", "parameters": {"city": {"type": "str"}}},
    {"name": "noop", "type": "api", "extra": "dropped"},
]
# The original's in-context prompt for ORIGINAL_LISTING and the query "Weather in Köln?", written out by hand.
ORIGINAL_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a function calling assistant. Given a user query and available tools, determine which functions to call "
    "and with what arguments.\n"
    "\n"
    "Available Tools:\n"
    "{\n"
    '  "get_weather": {\n'
    '    "name": "get_weather",\n'
    '    "description": "Wetter f\\u00fcr eine Stadt",\n'
    '    "parameters": {\n'
    '      "city": {\n'
    '        "type": "str"\n'
    "      }\n"
    "    },\n"
    '    "type": ""\n'
    "  },\n"
    '  "noop": {\n'
    '    "name": "noop",\n'
    '    "description": "",\n'
    '    "parameters": {},\n'
    '    "type": "api"\n'
    "  }\n"
    "}\n"
    "\n"
    "IMPORTANT: Output ONLY the function call arguments as JSON objects. For each function call needed, output the "
    "JSON arguments directly without any extra text, explanations, or formatting.\n"
    "\n"
    "Format: Output each function call as a separate JSON object on its own line:\n"
    '{"param1": "value1", "param2": "value2"}\n'
    '{"param1": "value3", "param2": "value4"}\n'
    "\n"
    "Examples:\n"
    '- For one function call: {"numbers": [5.5, 2.2, 9.9], "descending": false}\n'
    "- For multiple calls: \n"
    '{"contingency_table": [[100, 150], [50, 100]], "significance_level": 0.01}\n'
    '{"contingency_table": [[200, 100], [150, 50]], "significance_level": 0.01}\n'
    '{"numbers": [5.5, 2.2, 9.9, 3.3, 7.7], "descending": false}\n'
    "\n"
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "Weather in Köln?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_original_prompt_text_is_the_originals():
    assert icl_baseline.original_icl_prompt_text("Weather in Köln?", ORIGINAL_LISTING) == ORIGINAL_PROMPT


def test_original_prompt_ids_hold_one_begin_of_text_and_no_date(tiny_tokenizer):
    ids = icl_baseline.icl_prompt_ids(tiny_tokenizer, "Weather in Köln?", ORIGINAL_LISTING, "original")
    bos = tiny_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tiny_tokenizer.decode(ids) == ORIGINAL_PROMPT
    assert "Date" not in tiny_tokenizer.decode(ids)
    toolkit = tiny_tokenizer.decode(icl_baseline.icl_prompt_ids(tiny_tokenizer, "q", ORIGINAL_LISTING))
    assert "Available Tools" not in toolkit and '"name":"get_weather"' in toolkit


def test_original_prompt_needs_llama3_turn_tokens(tiny_tokenizer):
    icl_baseline.check_icl_prompt(tiny_tokenizer, "original")

    class PlainTokenizer:
        def get_vocab(self):
            return {"<|begin_of_text|>": 0, "hello": 1}

    icl_baseline.check_icl_prompt(PlainTokenizer(), "toolkit")
    with pytest.raises(UserError, match="--icl_prompt original writes Llama-3 turns.*<\\|start_header_id\\|>"):
        icl_baseline.check_icl_prompt(PlainTokenizer(), "original")


@pytest.mark.parametrize("answer, calls", [
    ('{"city": "Paris"}\n\n{"amount": 5}', [{"city": "Paris"}, {"amount": 5}]),
    ('Sure:\n{"city": "Paris"}\n[1, 2]\n"text"\nnull', [{"city": "Paris"}, {"value": [1, 2]}, {"value": "text"},
                                                        {"value": None}]),
    ('{\n  "city": "Paris"\n}', [{"city": "Paris"}]),
    ('[{"city": "Paris"}, 3]', [{"value": [{"city": "Paris"}, 3]}]),
    ('[{"city": "Paris"},\n {"amount": 5}, 3]', [{"city": "Paris"}, {"amount": 5}, {"value": 3}]),
    ('{"a": 1} {"b": 2}', ['{"a": 1} {"b": 2}']),
    ('Here you go: {"city": "Paris"}', ['Here you go: {"city": "Paris"}']),
    ("   \n ", []),
])
def test_original_answer_reading(answer, calls):
    assert icl_baseline.original_answer_calls(answer) == calls


def test_original_reading_scores_an_unparseable_answer_as_one_parse_error():
    read = icl_baseline.read_answer('Here you go: {"city": "Paris"}', DESCRIPTIONS, "original")
    assert read.tools == [icl_baseline.UNKNOWN_TOOL] and read.calls == [""] and read.paper_tools == []
    metrics = score_predictions([{"predicted_tools": read.tools, "function_calls": read.calls,
                                  "gold_tools": ["get_weather"], "gold_calls": ['{"city": "Paris"}']}])
    assert metrics["parse_error_rate"] == 1.0 and metrics["avg_f1_score"] == 0.0
    toolkit = icl_baseline.read_answer('Here you go: {"city": "Paris"}', DESCRIPTIONS)
    assert toolkit.tools == ["get_weather"] and json.loads(toolkit.calls[0]) == {"city": "Paris"}
    named = icl_baseline.read_answer("get_weather(city='Paris')\nthanks", DESCRIPTIONS, "original")
    assert named.calls == [""] and named.paper_tools == ["get_weather"]


def test_original_reading_keeps_the_whole_line_object_as_the_call():
    answer = '{"city": "Paris", "date": "2024-05-01"}\n{"name": "convert_currency", "arguments": {"amount": 5}}'
    read = icl_baseline.read_answer(answer, DESCRIPTIONS, "original")
    assert read.tools == ["get_weather", "convert_currency"]
    assert [json.loads(call) for call in read.calls] == [{"city": "Paris", "date": "2024-05-01"},
                                                         {"name": "convert_currency", "arguments": {"amount": 5}}]
    assert read.paper_tools == ["convert_currency"]


@pytest.mark.parametrize("call, tool", [
    ('{"city": "Paris"}', "city"),
    ('{"city": "Paris", "date": "2024-05-01"}', None),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "get_weather"),
    ('{"function": "f", "name": "g"}', "f"),
    ({"only": 1}, "only"),
    ('note {"city": "x"} end', "city"),
    ("get_weather(city='Paris') please", "get_weather"),
    ("get_weather (", "get_weather"),
    ("", None),
    ("{}", None),
    ("[1]", None),
])
def test_original_call_tool(call, tool):
    assert icl_baseline.original_call_tool(call) == tool


def test_paper_tool_scores_follow_the_originals_in_context_rule():
    assert icl_baseline.original_tool_scores([], []) == {"paper_avg_tool_f1_score": 1.0,
                                                         "paper_avg_tool_precision": 0.0,
                                                         "paper_avg_tool_recall": 1.0}
    assert icl_baseline.original_tool_scores(["a"], []) == {"paper_avg_tool_f1_score": 0.0,
                                                            "paper_avg_tool_precision": 0.0,
                                                            "paper_avg_tool_recall": 1.0}
    # Sets: {a, b} against {a, c}: precision 1/2, recall 1/2.
    assert icl_baseline.original_tool_scores(["a", "a", "b"], ["a", "c"])["paper_avg_tool_f1_score"] == 0.5
    gold = ['{"city": "Paris"}', '{"amount": 5, "to_currency": "EUR"}']
    predictions = [
        # gold names {city} (the two-key call names none); predicted {city}: F1 1.
        {"predicted_tools": ["get_weather"], "function_calls": ['{"city": "Paris"}'], "gold_tools": ["get_weather",
         "convert_currency"], "gold_calls": gold},
        # one gold call naming {city}; predicted names none: F1 0, precision 0, recall 0.
        {"predicted_tools": ["get_weather"], "function_calls": ['{"city": "Rome", "date": "x"}'],
         "gold_tools": ["get_weather"], "gold_calls": ['{"city": "Rome"}']},
    ]
    for prediction in predictions:
        read = icl_baseline.read_answer("\n".join(prediction["function_calls"]), DESCRIPTIONS, "original")
        prediction["paper_predicted_tools"] = read.paper_tools
        prediction["paper_gold_tools"] = [icl_baseline.original_call_tool(c) for c in prediction["gold_calls"]
                                          if icl_baseline.original_call_tool(c)]
    metrics = icl_baseline.icl_metrics(predictions)
    assert metrics["paper_avg_tool_f1_score"] == 0.5
    assert metrics["paper_avg_tool_precision"] == 0.5 and metrics["paper_avg_tool_recall"] == 0.5
    assert metrics["call_count_breakdown"]["2"]["paper_avg_tool_f1_score"] == 1.0
    assert metrics["call_count_breakdown"]["1"]["paper_avg_tool_f1_score"] == 0.0
    assert metrics["avg_tool_f1_score"] == pytest.approx((2 / 3 + 1.0) / 2)


class FakeRetriever:
    """Ranks tools by a fixed score table, like ToolRetriever.retrieve_batch (best first)."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.calls = 0

    def retrieve_batch(self, queries, k):
        self.calls += 1
        ranked = sorted(self.scores.items(), key=lambda item: -item[1])[:k]
        return [ranked for _ in queries]


def test_rag_lists_only_the_top_k_tools_in_score_order(tiny_tokenizer):
    samples = [{"user_input": "fly to Rome", "tools": ["search_flights"]}] * 3
    retriever = FakeRetriever({"get_weather": 0.2, "search_flights": 0.9, "convert_currency": 0.5})
    offered = icl_baseline.offered_tools(samples, DESCRIPTIONS, retriever, 2)
    assert retriever.calls == 1
    assert offered == [["search_flights", "convert_currency"]] * 3
    ids = icl_baseline.icl_prompt_ids(tiny_tokenizer, samples[0]["user_input"],
                                      [DESCRIPTIONS[name] for name in offered[0]])
    system = tiny_tokenizer.decode(ids).split("<|eot_id|>")[0]
    assert system.index('"search_flights"') < system.index('"convert_currency"')
    assert '"get_weather"' not in system
    assert icl_baseline.offered_tools(samples, DESCRIPTIONS, None, 2) == [list(DESCRIPTIONS)] * 3


def test_prompt_lengths_icl_rag_and_tool_memory(tiny_tokenizer):
    samples = [{"user_input": "Weather in Paris?", "tools": ["get_weather"]}]
    rag = [icl_baseline.icl_prompt_ids(tiny_tokenizer, samples[0]["user_input"], [DESCRIPTIONS["get_weather"]])]
    stats = icl_baseline.prompt_lengths(tiny_tokenizer, samples, DESCRIPTIONS, rag, rag=True)
    memory = len(build_prompt_ids(tiny_tokenizer, samples[0]["user_input"]))
    assert stats["tool_memory"] == {"mean": memory, "max": memory}
    assert stats["icl"]["mean"] > stats["rag"]["mean"] > memory


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def test_paths_from_repeats_and_comma_lists():
    assert icl_baseline.split_paths(["a.json,b.json", "a.json", "c.json"]) == [Path("a.json"), Path("b.json"),
                                                                              Path("c.json")]
    test = Path("data/test/function_calling_test_tools21-40_3calls.json")
    assert icl_baseline.descriptions_path_for(test) == Path("data/tool_descriptions_tools21-40.json")
    assert icl_baseline.evaluated_set_name([Path("x/function_calling_test_tools1-20_3calls.json"), Path("mine.json")]
                                           ) == "1-20+mine"


def test_max_samples_keeps_a_seeded_subset_of_each_file(tmp_path):
    write_round_files(tmp_path, 1, 6, TOOL_NAMES, n_test=6)
    write_round_files(tmp_path, 7, 9, TOOL_NAMES[:3], n_test=2)
    tests = [tmp_path / "test" / "function_calling_test_tools1-6_4calls.json",
             tmp_path / "test" / "function_calling_test_tools7-9_4calls.json"]
    descriptions = icl_baseline.load_descriptions([tmp_path / "tool_descriptions_tools1-6.json"])
    first = icl_baseline.load_test_sets(tests, descriptions, 3, seed=1)
    assert [(s.name, len(s.samples)) for s in first] == [("1-6", 3), ("7-9", 2)]
    assert first == icl_baseline.load_test_sets(tests, descriptions, 3, seed=1)
    whole = json.loads(tests[0].read_text())
    assert all(sample in whole for sample in first[0].samples)
    assert [len(s.samples) for s in icl_baseline.load_test_sets(tests, descriptions, 100, seed=1)] == [6, 2]


def test_each_test_file_is_a_named_set():
    ranged = [Path("a/function_calling_test_tools1-20_3calls.json"),
              Path("b/function_calling_test_tools21-40_3calls.json"), Path("c/mine.json")]
    assert icl_baseline.set_names(ranged) == ["1-20", "21-40", "mine"]
    same_range = [Path("function_calling_test_tools1-20_3calls.json"),
                  Path("function_calling_test_tools1-20_4calls.json")]
    assert icl_baseline.set_names(same_range) == ["function_calling_test_tools1-20_3calls",
                                                 "function_calling_test_tools1-20_4calls"]
    with pytest.raises(UserError, match="would both be reported as set 'mine'"):
        icl_baseline.set_names([Path("a/mine.json"), Path("b/mine.json")])


def test_per_set_results_score_each_file_on_its_own_predictions():
    def prediction(tool: str, call: str, right: bool) -> dict:
        return {"predicted_tools": [tool if right else "other"], "function_calls": [call if right else "{}"],
                "gold_tools": [tool], "gold_calls": [call], "paper_predicted_tools": [], "paper_gold_tools": []}

    sets = [icl_baseline.TestSet("1-3", Path("one.json"), [{}] * 2), icl_baseline.TestSet("4-6", Path("two.json"),
                                                                                        [{}] * 3)]
    predictions = [prediction("a", '{"x": 1}', True), prediction("a", '{"x": 2}', True),
                   prediction("b", '{"y": 1}', False), prediction("b", '{"y": 2}', True),
                   prediction("b", '{"y": 3}', False)]
    scored = icl_baseline.per_set_results(sets, predictions)
    assert list(scored) == ["1-3", "4-6"]
    assert scored["1-3"]["metrics"]["exact_accuracy"] == 1.0 and scored["1-3"]["metrics"]["total_examples"] == 2
    assert scored["4-6"]["metrics"]["exact_accuracy"] == pytest.approx(1 / 3)
    assert scored["4-6"]["test_data"] == "two.json"
    assert [p["test_set"] for p in predictions] == ["1-3", "1-3", "4-6", "4-6", "4-6"]


# ----------------------------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture
def round_data(tmp_path) -> tuple[Path, Path]:
    write_round_files(tmp_path / "data", 1, 6, TOOL_NAMES, n_test=5)
    test = tmp_path / "data" / "test" / "function_calling_test_tools1-6_4calls.json"
    return test, tmp_path / "data" / "tool_descriptions_tools1-6.json"


@pytest.mark.slow
def test_tiny_icl_run_writes_the_run_directory(tiny_model_dir, round_data, tmp_path, capsys, restore_logging):
    test, _ = round_data
    run = tmp_path / "runs" / "icl"
    assert icl_baseline.main(["--test_data", str(test), "--model_name", str(tiny_model_dir), "--device", "cpu",
                              "--batch_size", "2", "--max_new_tokens", "6", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "exact_accuracy" in out and "ICL (all 6 tools)" in out and "tool memory (TokMem)" in out
    for name in ("config.json", "metrics.jsonl", "predictions.jsonl", "results.json", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "icl" and summary["rounds"] == ["1-6"]
    assert summary["parameters"]["trainable"] == 0 and summary["backward_transfer"]["avg_f1_score"] is None
    cell = summary["matrix"]["avg_tool_f1_score"]
    assert len(cell) == 1 and len(cell[0]) == 1
    assert summary["average_after_last"]["avg_tool_f1_score"] == cell[0][0]
    assert summary["matrix"]["paper_avg_tool_f1_score"][0][0] is not None
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["total_examples"] == 5
    tokens = results["prompt_tokens"]
    assert tokens["icl"]["mean"] > tokens["tool_memory"]["mean"] and "rag" not in tokens
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 5 and all(len(p["predicted_tools"]) == len(p["function_calls"]) for p in predictions)


@pytest.mark.slow
def test_two_test_files_are_two_sets_with_the_original_prompt(tiny_model_dir, tmp_path, capsys, restore_logging,
                                                             monkeypatch):
    # Six tools in the original's indented listing pass the test model's 1024 positions; RoPE decodes past them, and
    # here the prompt and the sets are tested, not the length check.
    monkeypatch.setattr(icl_baseline, "model_positions", lambda name: None)
    data = tmp_path / "data"
    write_round_files(data, 1, 3, TOOL_NAMES[:3], n_test=3)
    write_round_files(data, 4, 6, TOOL_NAMES[3:], n_test=2)
    tests = [data / "test" / f"function_calling_test_tools{r}_4calls.json" for r in ("1-3", "4-6")]
    run = tmp_path / "runs" / "icl"
    assert icl_baseline.main(["--test_data", f"{tests[0]},{tests[1]}", "--model_name", str(tiny_model_dir),
                              "--device", "cpu", "--max_new_tokens", "6", "--icl_prompt", "original",
                              "--icl_answer", "original", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "icl on test set 1-3" in out and "icl on test set 4-6" in out and "all 2 test sets pooled" in out
    results = json.loads((run / "results.json").read_text())
    assert list(results["sets"]) == ["1-3", "4-6"] and results["evaluated"] == "1-3+4-6"
    assert [results["sets"][name]["metrics"]["total_examples"] for name in ("1-3", "4-6")] == [3, 2]
    assert results["metrics"]["total_examples"] == 5 and results["icl_prompt"] == "original"
    assert "paper_avg_tool_f1_score" in results["metrics"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == ["1-3", "4-6"]
    grid = summary["matrix"]["exact_accuracy"]
    assert grid[0] == [None, None]
    assert grid[1] == [results["sets"][name]["metrics"]["exact_accuracy"] for name in ("1-3", "4-6")]
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["icl_prompt"] == "original" and config["args"]["icl_answer"] == "original"
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [p["test_set"] for p in predictions] == ["1-3"] * 3 + ["4-6"] * 2
    assert all(p["prompt_tokens"] > 150 for p in predictions)


@pytest.mark.slow
def test_tiny_rag_run_writes_a_results_file(tiny_model_dir, round_data, tmp_path, capsys, restore_logging):
    test, descriptions = round_data
    results_file = tmp_path / "rag.json"
    assert icl_baseline.main(["--test_data", str(test), "--tool_descriptions", str(descriptions), "--use_rag",
                              "--retrieval_k", "2", "--model_name", str(tiny_model_dir), "--device", "cpu",
                              "--max_new_tokens", "6", "--max_samples", "4", "--retrieval_text", "original",
                              "--icl_shots", "2", "--output", str(results_file)]) == 0
    out = capsys.readouterr().out
    assert "RAG (top 2 tools)" in out and "retrieval recall@2" in out
    results = json.loads(results_file.read_text())
    assert results["method"] == "icl_rag" and results["metrics"]["total_examples"] == 4
    assert results["retrieval"]["text"] == "original" and list(results["sets"]) == ["1-6"]
    predictions = results["predictions"]
    assert all(len(p["offered_tools"]) == 2 for p in predictions)
    # recall@k: per query, the share of its distinct gold tools among the offered (retrieved) ones, averaged.
    shares = [len(set(p["gold_tools"]) & set(p["offered_tools"])) / len(set(p["gold_tools"])) for p in predictions]
    assert results["retrieval"]["recall_at_k"] == pytest.approx(sum(shares) / len(shares))
    covered = [set(p["gold_tools"]) <= set(p["offered_tools"]) for p in predictions]
    assert results["retrieval"]["all_gold_retrieved"] == pytest.approx(sum(covered) / len(covered))
    tokens = results["prompt_tokens"]
    assert tokens["icl"]["mean"] > tokens["rag"]["mean"] > tokens["tool_memory"]["mean"]
    # Two solved examples from the range's training file before each query, counted in its prompt.
    assert results["icl_shots"] == 2 and results["shots_data"] == [
        str(test.parent.parent / "training" / "function_calling_train_tools1-6_4calls.json")]
    assert all(p["prompt_tokens"] > 2 * 20 + tokens["tool_memory"]["max"] for p in predictions)


@pytest.mark.parametrize("flags, message", [
    (["--retrieval_k", "0"], "--retrieval_k"),
    (["--retrieval_k", "-3"], "--retrieval_k"),
    (["--max_samples", "0"], "--max_samples"),
    (["--batch_size", "0"], "--batch_size"),
    (["--icl_prompt", "llama"], "--icl_prompt"),
    (["--icl_answer", "strict"], "--icl_answer"),
    (["--retrieval_text", "mine"], "--retrieval_text"),
])
def test_bad_flags_exit_2(flags, message, round_data, capsys):
    test, _ = round_data
    with pytest.raises(SystemExit) as exit_info:
        icl_baseline.main(["--test_data", str(test), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_files_are_user_errors(round_data, tmp_path, restore_logging):
    test, descriptions = round_data
    with pytest.raises(UserError, match="data file not found"):
        icl_baseline.main(["--test_data", str(tmp_path / "none.json"), "--tool_descriptions", str(descriptions)])
    mine = tmp_path / "mine.json"
    mine.write_text(test.read_text())
    with pytest.raises(UserError, match="tool descriptions file not found"):
        icl_baseline.main(["--test_data", str(mine), "--tool_descriptions", str(tmp_path / "x.json")])
    with pytest.raises(UserError, match="pass --tool_descriptions"):
        icl_baseline.main(["--test_data", str(mine)])
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({name: json.loads(descriptions.read_text())[name] for name in TOOL_NAMES[:2]}))
    with pytest.raises(UserError, match="row 1: tool .* has no description"):
        icl_baseline.main(["--test_data", str(test), "--tool_descriptions", str(partial)])
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        icl_baseline.main(["--test_data", str(broken), "--tool_descriptions", str(descriptions)])


def test_cli_error_is_one_line_with_status_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "icl_baseline.py"), "--test_data",
                             str(tmp_path / "missing.json"), "--tool_descriptions", str(tmp_path / "d.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert f"data file not found: {tmp_path / 'missing.json'}" in result.stderr  # the test file, named first
