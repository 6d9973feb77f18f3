"""In-context baselines on an instruct model: solved examples before the query (--icl_shots), ChatML prompts, and
answers as instruct models write them (code fences, prose, lists)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import icl_baseline
from common import UserError
from conftest import CHATML_TEMPLATE, TOOL_NAMES, make_sample, write_round_files
from dataset import build_prompt_ids, icl_answer_text
from test_icl_baseline import DESCRIPTIONS
from test_scripts import dry_run

# ----------------------------------------------------------------------------------------------------------------------
# Answers as an instruct model writes them

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "date": "2024-05-01"}}
CURRENCY = {"name": "convert_currency", "arguments": {"amount": 5, "from_currency": "USD", "to_currency": "EUR"}}


@pytest.mark.parametrize("answer", [
    f"```json\n{json.dumps(WEATHER, indent=2)}\n```",
    f"Sure! To get the weather in Paris, I will call the tool: {json.dumps(WEATHER)}",
    f"{json.dumps(WEATHER)}\n\nThis call returns the forecast for Paris on {{date}}.",
    f"Here is the call:\n```json\n{json.dumps([WEATHER])}\n```\nLet me know if you need anything else.",
    f'{{"name": "get_weather", "parameters": {json.dumps(WEATHER["arguments"])}}}',
    json.dumps({"type": "function", "function": {**WEATHER, "arguments": json.dumps(WEATHER["arguments"])}}),
])
def test_one_call_however_it_is_wrapped(answer):
    tools, calls = icl_baseline.answer_to_calls(answer, DESCRIPTIONS)
    assert tools == ["get_weather"] and [json.loads(call) for call in calls] == [WEATHER["arguments"]]


def test_two_calls_in_a_fenced_list_and_in_prose():
    expected = (["get_weather", "convert_currency"], [WEATHER["arguments"], CURRENCY["arguments"]])
    for answer in (f"```json\n{json.dumps([WEATHER, CURRENCY], indent=4)}\n```",
                   f"First {json.dumps(WEATHER)}, then {json.dumps(CURRENCY)}. Done."):
        tools, calls = icl_baseline.answer_to_calls(answer, DESCRIPTIONS)
        assert (tools, [json.loads(call) for call in calls]) == expected


def test_prose_and_code_without_calls_give_none():
    answer = ("To get the weather, use `get_weather` with {city} and {date}:\n```python\n"
              "print(get_weather(city))\n```")
    assert icl_baseline.answer_to_calls(answer, DESCRIPTIONS) == ([], [])


# ----------------------------------------------------------------------------------------------------------------------
# Picking the examples

POOL = [make_sample(tools, [{"q": i}] * len(tools), f"query {i}")
        for i, tools in enumerate([["a"], ["b"], ["c"], ["a", "b"], ["b", "c"], ["a"], ["c"], ["b"]])]


def test_shots_follow_a_seeded_order():
    order = icl_baseline.shot_order(len(POOL), seed=3)
    assert order == icl_baseline.shot_order(len(POOL), seed=3) and sorted(order) == list(range(len(POOL)))
    assert order != icl_baseline.shot_order(len(POOL), seed=4)
    shots = icl_baseline.pick_shots(POOL, order, ["a", "b", "c"], 3)
    assert shots == [POOL[i] for i in order[:3]]  # every tool offered (ICL): the first three of the order


def test_rag_shots_prefer_the_retrieved_tools():
    order = list(range(len(POOL)))
    assert [s["user_input"] for s in icl_baseline.pick_shots(POOL, order, ["b"], 2)] == ["query 1", "query 7"]
    # Too few calling only retrieved tools: then those sharing one, then any, each in the seeded order.
    assert [s["user_input"] for s in icl_baseline.pick_shots(POOL, order, ["a"], 4)] == [
        "query 0", "query 5", "query 3", "query 1"]


def test_each_test_set_draws_from_its_own_pool():
    sets = [icl_baseline.TestSet("1-3", Path("x"), [{}] * 2, shot_pool=POOL[:3]),
            icl_baseline.TestSet("4-6", Path("y"), [{}], shot_pool=POOL[5:])]
    chosen = icl_baseline.choose_shots(sets, [["a", "b", "c"]] * 3, 2, seed=0)
    assert chosen[0] == chosen[1] and all(shot in POOL[:3] for shot in chosen[0])
    assert len(chosen[2]) == 2 and all(shot in POOL[5:] for shot in chosen[2])
    assert icl_baseline.choose_shots(sets, [["a"]] * 3, 0, seed=0) == [[], [], []]


# ----------------------------------------------------------------------------------------------------------------------
# The training file


def test_shots_come_from_the_ranges_training_file(tmp_path):
    write_round_files(tmp_path, 1, 6, TOOL_NAMES, train_calls=2, test_calls=4, n_train=5)
    test = tmp_path / "test" / "function_calling_test_tools1-6_4calls.json"
    train = tmp_path / "training" / "function_calling_train_tools1-6_2calls.json"
    assert icl_baseline.shots_path_for(test) == train
    write_round_files(tmp_path, 1, 6, TOOL_NAMES, train_calls=4, test_calls=4, n_train=5)
    assert icl_baseline.shots_path_for(test) == tmp_path / "training" / "function_calling_train_tools1-6_4calls.json"
    descriptions = icl_baseline.load_descriptions([tmp_path / "tool_descriptions_tools1-6.json"])
    sets = icl_baseline.load_test_sets([test], descriptions, None, 0)
    icl_baseline.load_shot_pools(sets, descriptions, 5)
    assert sets[0].shot_pool == json.loads(train.with_name("function_calling_train_tools1-6_4calls.json").read_text())
    with pytest.raises(UserError, match=r"--icl_shots 6: training file .* has 5 examples"):
        icl_baseline.load_shot_pools(sets, descriptions, 6)


def test_a_missing_training_file_is_a_one_line_error(tmp_path, restore_logging):
    write_round_files(tmp_path, 1, 6, TOOL_NAMES)
    (tmp_path / "training" / "function_calling_train_tools1-6_4calls.json").unlink()
    test = tmp_path / "test" / "function_calling_test_tools1-6_4calls.json"
    with pytest.raises(UserError) as error:
        icl_baseline.main(["--test_data", str(test), "--icl_shots", "2", "--output", str(tmp_path / "r.json")])
    message = str(error.value)
    assert "\n" not in message and message.startswith("--icl_shots: training file not found: ")
    assert "function_calling_train_tools1-6_4calls.json" in message and "xlam_datasets.py" in message
    with pytest.raises(UserError, match="cannot tell which training file goes with"):
        icl_baseline.shots_path_for(tmp_path / "mine.json")
    with pytest.raises(UserError, match="--icl_shots needs --icl_prompt toolkit"):
        icl_baseline.main(["--test_data", str(test), "--icl_shots", "1", "--icl_prompt", "original"])


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


SHOTS = [make_sample(["get_weather"], [{"city": "Rome"}], "Weather in Rome?"),
         make_sample(["convert_currency", "get_weather"], [{"amount": 3}, {"city": "Oslo"}], "3 USD, and Oslo?")]


def test_shots_are_chat_turns_and_count_in_the_prompt_length(tiny_tokenizer):
    listing = list(DESCRIPTIONS.values())
    bare = icl_baseline.icl_prompt_ids(tiny_tokenizer, "Weather in Paris?", listing)
    ids = icl_baseline.icl_prompt_ids(tiny_tokenizer, "Weather in Paris?", listing, shots=SHOTS)
    text = tiny_tokenizer.decode(ids)
    turns = "".join(f"<|start_header_id|>user<|end_header_id|>\n\n{shot['user_input']}<|eot_id|>"
                    f"<|start_header_id|>assistant<|end_header_id|>\n\n"
                    f"{icl_answer_text(shot['tools'], shot['function_calls'])}<|eot_id|>" for shot in SHOTS)
    system_end = text.index("<|eot_id|>") + len("<|eot_id|>")
    assert text[system_end:] == (turns + "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert len(ids) == len(bare) + len(tiny_tokenizer(turns, add_special_tokens=False)["input_ids"])
    samples = [{"user_input": "Weather in Paris?", "tools": ["get_weather"]}]
    rag = [icl_baseline.icl_prompt_ids(tiny_tokenizer, "Weather in Paris?", [DESCRIPTIONS["get_weather"]],
                                       shots=SHOTS)]
    stats = icl_baseline.prompt_lengths(tiny_tokenizer, samples, DESCRIPTIONS, rag, True, icl_shots=[SHOTS])
    assert stats["icl"]["max"] == len(ids) and stats["rag"]["max"] == len(rag[0])


def test_chatml_prompt_keeps_the_tool_list_in_its_system_turn(tied_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tied_model_dir)
    listing = [DESCRIPTIONS["get_weather"]]
    ids = icl_baseline.icl_prompt_ids(tokenizer, "Weather in Paris?", listing, shots=SHOTS[:1])
    system = icl_baseline.tool_system_prompt(listing)
    answer = icl_answer_text(SHOTS[0]["tools"], SHOTS[0]["function_calls"])
    assert tokenizer.decode(ids) == (f"<|im_start|>system\n{system}<|im_end|>\n"
                                     f"<|im_start|>user\nWeather in Rome?<|im_end|>\n"
                                     f"<|im_start|>assistant\n{answer}<|im_end|>\n"
                                     "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|eot_id|>" not in tokenizer.decode(ids)
    assert icl_baseline._stop_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # SmolLM2-style templates write a default system turn when the messages have none: the tool list replaces it.
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n"
                               "{% endif %}" + CHATML_TEMPLATE)
    assert "Default." not in tokenizer.decode(icl_baseline.icl_prompt_ids(tokenizer, "q", listing, shots=SHOTS))
    assert tokenizer.decode(build_prompt_ids(tokenizer, "q")).startswith("<|im_start|>system\nDefault.<|im_end|>")


# ----------------------------------------------------------------------------------------------------------------------
# The script


def test_script_passes_icl_shots_to_both_runs(tmp_path):
    commands = dry_run("icl_baseline.sh", tmp_path, ICL_SHOTS="3")
    runs = [flags for script, flags, _ in commands if script == "icl_baseline.py"]
    assert len(runs) == 2 and [flags["--icl_shots"] for flags in runs] == ["3", "3"]
    default = [flags for script, flags, _ in dry_run("icl_baseline.sh", tmp_path) if script == "icl_baseline.py"]
    assert [flags["--icl_shots"] for flags in default] == ["0", "0"]


def test_a_truncated_pretty_printed_object_is_one_unparseable_call():
    answer = ('Here is a sample:\n```json\n{\n    "name": "get_weather",\n    "data": {\n        "type": "json",\n'
              '        "data": {\n            "type": "js')
    calls = icl_baseline.parse_answer(answer)
    assert len(calls) == 1 and isinstance(calls[0], str) and calls[0].startswith('{\n    "name"')
    # One call per line, as the prompt asks: a broken line is one parse error and the next line is still read.
    lines = '{"name": "get_weather", "arguments": {"city": "Paris"}\n{"name": "get_weather", "arguments": {}}'
    calls = icl_baseline.parse_answer(lines)
    assert isinstance(calls[0], str) and calls[1] == {"name": "get_weather", "arguments": {}}
    literal = "I would call {'name': 'get_weather',\n 'arguments': {'city': 'Paris'}} now."
    assert icl_baseline.parse_answer(literal) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
