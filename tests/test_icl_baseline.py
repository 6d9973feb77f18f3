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


def test_max_samples_keeps_a_seeded_subset(tmp_path):
    write_round_files(tmp_path, 1, 6, TOOL_NAMES, n_test=6)
    test = tmp_path / "test" / "function_calling_test_tools1-6_4calls.json"
    descriptions = icl_baseline.load_descriptions([tmp_path / "tool_descriptions_tools1-6.json"])
    first = icl_baseline.load_test_set([test], descriptions, 3, seed=1)
    assert len(first) == 3 and first == icl_baseline.load_test_set([test], descriptions, 3, seed=1)
    assert len(icl_baseline.load_test_set([test], descriptions, 100, seed=1)) == 6


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
def test_tiny_rag_run_writes_a_results_file(tiny_model_dir, round_data, tmp_path, capsys, restore_logging):
    test, descriptions = round_data
    results_file = tmp_path / "rag.json"
    assert icl_baseline.main(["--test_data", str(test), "--tool_descriptions", str(descriptions), "--use_rag",
                              "--retrieval_k", "2", "--model_name", str(tiny_model_dir), "--device", "cpu",
                              "--max_new_tokens", "6", "--max_samples", "4", "--output", str(results_file)]) == 0
    out = capsys.readouterr().out
    assert "RAG (top 2 tools)" in out and "retrieval recall@2" in out
    results = json.loads(results_file.read_text())
    assert results["method"] == "icl_rag" and results["metrics"]["total_examples"] == 4
    predictions = results["predictions"]
    assert all(len(p["offered_tools"]) == 2 for p in predictions)
    # recall@k: per query, the share of its distinct gold tools among the offered (retrieved) ones, averaged.
    shares = [len(set(p["gold_tools"]) & set(p["offered_tools"])) / len(set(p["gold_tools"])) for p in predictions]
    assert results["retrieval"]["recall_at_k"] == pytest.approx(sum(shares) / len(shares))
    covered = [set(p["gold_tools"]) <= set(p["offered_tools"]) for p in predictions]
    assert results["retrieval"]["all_gold_retrieved"] == pytest.approx(sum(covered) / len(covered))
    tokens = results["prompt_tokens"]
    assert tokens["icl"]["mean"] > tokens["rag"]["mean"] > tokens["tool_memory"]["mean"]


@pytest.mark.parametrize("flags, message", [
    (["--retrieval_k", "0"], "--retrieval_k"),
    (["--retrieval_k", "-3"], "--retrieval_k"),
    (["--max_samples", "0"], "--max_samples"),
    (["--batch_size", "0"], "--batch_size"),
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
    with pytest.raises(UserError, match="tool descriptions file not found"):
        icl_baseline.main(["--test_data", str(tmp_path / "mine.json"), "--tool_descriptions", str(tmp_path / "x.json")])
    with pytest.raises(UserError, match="pass --tool_descriptions"):
        icl_baseline.main(["--test_data", str(tmp_path / "mine.json")])
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
    assert "tool descriptions file not found" in result.stderr
