"""dataset.py: the prompt and its labels, truncation, left-padding collate, seeded shuffling, the curriculum order."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from common import UserError
from conftest import TOOL_NAMES, make_sample
from dataset import (IGNORE_INDEX, NativeFunctionCallingDataset, build_answer_ids, curriculum_order,
                     discover_available_tools, left_pad_collate, make_dataloader)

SAMPLE = make_sample(["book_table", "get_weather"], [{"n": 4}, {"city": "Paris"}], "Book for 4, then Paris weather")


def tool_token(tokenizer, tool: str) -> int:
    return tokenizer.convert_tokens_to_ids(f"<|reserved_special_token_{TOOL_NAMES.index(tool)}|>")


@pytest.fixture(scope="module")
def encode_tool(tiny_tokenizer):
    return lambda tool: [tool_token(tiny_tokenizer, tool)]


def prompt_text(tokenizer, query: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                         add_generation_prompt=True)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_training_item_labels_the_answer_and_nothing_of_the_prompt(tiny_tokenizer, encode_tool):
    (item,) = NativeFunctionCallingDataset([SAMPLE], tiny_tokenizer, encode_tool, 512, "train")
    prompt = ids(tiny_tokenizer, prompt_text(tiny_tokenizer, SAMPLE["user_input"]))
    answer = ([tool_token(tiny_tokenizer, "book_table")] + ids(tiny_tokenizer, '{"n": 4}')
              + [tool_token(tiny_tokenizer, "get_weather")] + ids(tiny_tokenizer, '{"city": "Paris"}')
              + [tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")])
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert not item["truncated"]
    assert (item["gold_tools"], item["gold_calls"]) == (SAMPLE["tools"], SAMPLE["function_calls"])


def test_an_eval_item_is_the_prompt_alone(tiny_tokenizer, encode_tool):
    (item,) = NativeFunctionCallingDataset([SAMPLE], tiny_tokenizer, encode_tool, 512, "eval")
    assert item["input_ids"] == ids(tiny_tokenizer, prompt_text(tiny_tokenizer, SAMPLE["user_input"]))
    assert item["labels"] is None
    assert tiny_tokenizer.decode(item["input_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_truncation_keeps_the_answer_and_cuts_the_head_of_the_query(tiny_tokenizer, encode_tool, caplog):
    query = SAMPLE["user_input"]
    prompt = ids(tiny_tokenizer, prompt_text(tiny_tokenizer, query))
    (full,) = NativeFunctionCallingDataset([SAMPLE], tiny_tokenizer, encode_tool, 512, "train")
    answer = full["input_ids"][len(prompt):]
    limit = len(full["input_ids"]) - 3
    with caplog.at_level(logging.WARNING, logger="dataset"):
        (cut,) = NativeFunctionCallingDataset([SAMPLE], tiny_tokenizer, encode_tool, limit, "train")
    kept = cut["input_ids"][: len(cut["input_ids"]) - len(answer)]
    assert cut["input_ids"][-len(answer):] == answer and len(cut["input_ids"]) <= limit
    assert cut["labels"] == [IGNORE_INDEX] * len(kept) + answer and cut["truncated"]
    # The kept prompt is the template around the query's last words: the longest such tail that fits.
    tails = [query[i:] for i in range(1, len(query)) if query[i - 1] == " " and query[i] != " "]
    fitting = [t for t in tails if len(ids(tiny_tokenizer, prompt_text(tiny_tokenizer, t))) + len(answer) <= limit]
    assert kept == ids(tiny_tokenizer, prompt_text(tiny_tokenizer, fitting[0]))
    assert "1 of 1 samples are longer than --max_length" in caplog.text
    # An answer that alone fills --max_length leaves no training sample: refused.
    with pytest.raises(UserError, match="every one of the 1 training samples has an answer longer than"):
        NativeFunctionCallingDataset([SAMPLE], tiny_tokenizer, encode_tool, len(answer), "train")
    # Eval: a prompt whose template alone is over the limit keeps its end (the assistant header).
    (short,) = NativeFunctionCallingDataset([SAMPLE], tiny_tokenizer, encode_tool, 5, "eval")
    assert short["input_ids"] == prompt[-5:] and short["truncated"]


def test_answer_needs_one_call_per_tool(tiny_tokenizer, encode_tool):
    with pytest.raises(ValueError):
        build_answer_ids(tiny_tokenizer, ["book_table", "get_weather"], ['{"n": 4}'], encode_tool)


def test_left_pad_collate_aligns_rows_on_the_right():
    batch = left_pad_collate([
        {"input_ids": [5, 6], "labels": [-100, 6], "gold_tools": ["a"], "gold_calls": ["{}"], "user_input": "q1"},
        {"input_ids": [7, 8, 9, 10], "labels": [-100, -100, 9, 10], "gold_tools": ["b"], "gold_calls": ["{}"],
         "user_input": "q2"},
    ], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6], [-100, -100, 9, 10]]
    assert batch["user_input"] == ["q1", "q2"] and batch["gold_tools"] == [["a"], ["b"]]
    no_labels = left_pad_collate([{"input_ids": [1], "labels": None, "gold_tools": [], "gold_calls": [],
                                   "user_input": "q"}], pad_token_id=3)
    assert no_labels["labels"] is None and no_labels["input_ids"].tolist() == [[1]]


def queries(loader) -> list[str]:
    return [q for batch in loader for q in batch["user_input"]]


def numbered_dataset(tokenizer, encode_tool, n: int = 10) -> NativeFunctionCallingDataset:
    samples = [make_sample(["get_weather"], [{"day": i}], f"query {i}") for i in range(n)]
    return NativeFunctionCallingDataset(samples, tokenizer, encode_tool, 128, "train")


def test_shuffling_is_seeded_and_visits_every_sample_once_per_epoch(tiny_tokenizer, encode_tool):
    data = numbered_dataset(tiny_tokenizer, encode_tool)
    everything = sorted(f"query {i}" for i in range(10))
    loader = make_dataloader(data, 3, 0, shuffle=True, seed=4)
    epochs = [queries(loader), queries(loader)]
    assert all(sorted(epoch) == everything for epoch in epochs)
    assert epochs[0] != epochs[1], "every epoch draws a new order"
    again = make_dataloader(data, 3, 0, shuffle=True, seed=4)
    assert [queries(again), queries(again)] == epochs
    others = {tuple(queries(make_dataloader(data, 3, 0, shuffle=True, seed=seed))) for seed in range(5)}
    assert len(others) > 1
    assert queries(make_dataloader(data, 3, 0, shuffle=False)) == [f"query {i}" for i in range(10)]


def test_curriculum_puts_fewer_calls_first_and_shuffles_within_a_count_by_seed():
    samples = [make_sample(["get_weather"] * n, [{"i": i}] * n, f"q{i}") for i, n in
               enumerate([3, 1, 2, 1, 3, 2, 1, 2, 1, 3, 1, 2])]
    ordered = curriculum_order(samples, seed=1)
    counts = [len(s["tools"]) for s in ordered]
    assert counts == sorted(counts) and Counter(counts) == {1: 5, 2: 4, 3: 3}
    assert sorted(s["user_input"] for s in ordered) == sorted(s["user_input"] for s in samples)
    assert curriculum_order(samples, seed=1) == ordered
    within = {tuple(s["user_input"] for s in curriculum_order(samples, seed) if len(s["tools"]) == 1)
              for seed in range(6)}
    assert len(within) > 1, "the order within a call count depends on the seed"


def test_tools_are_listed_round_by_round_sorted_within_a_round_once_each():
    first = [make_sample(["search_flights"], [{}]), make_sample(["get_weather", "book_table"], [{}, {}])]
    second = [make_sample(["translate_text"], [{}]), make_sample(["get_weather", "calculate_bmi"], [{}, {}])]
    assert discover_available_tools([first, second]) == ["book_table", "get_weather", "search_flights",
                                                         "calculate_bmi", "translate_text"]


def test_collated_batch_matches_its_items(tiny_tokenizer, encode_tool):
    data = NativeFunctionCallingDataset([SAMPLE, make_sample(["get_weather"], [{"city": "Rome"}], "Rome?")],
                                        tiny_tokenizer, encode_tool, 512, "train")
    batch = next(iter(make_dataloader(data, 2, tiny_tokenizer.pad_token_id, shuffle=False)))
    for row, item in enumerate(data):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, -n:].tolist() == item["input_ids"]
        assert batch["labels"][row, -n:].tolist() == item["labels"]
        assert int(batch["attention_mask"][row].sum()) == n
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
