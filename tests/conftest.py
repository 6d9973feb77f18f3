"""Shared fixtures: a tiny tokenizer with the Llama-3 special tokens and a tiny random Llama, built in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOOL_NAMES = ["get_weather", "convert_currency", "search_flights", "calculate_bmi", "book_table", "translate_text"]

TRAINING_TEXTS = [
    "What is the weather in Paris on 2024-05-01?",
    "Convert 100 USD to EUR please.",
    "Find flights from Berlin to Rome on 2024-06-10.",
    "Compute the BMI for 70 kg and 1.75 m.",
    "Book a table for 4 at Luigi at 19:00.",
    "Translate 'good morning' into Spanish.",
    '{"city": "Paris", "date": "2024-05-01"}',
    '{"amount": 100, "from_currency": "USD", "to_currency": "EUR"}',
    '{"origin": "Berlin", "destination": "Rome", "date": "2024-06-10"}',
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_backbone import build_tokenizer

    return build_tokenizer(TRAINING_TEXTS, vocab_size=900)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random tiny Llama (2 layers, hidden 64) with the tiny tokenizer: a valid --model_name."""
    import torch
    from tiny_backbone import build_random_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    model = build_random_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def make_sample(tools: list[str], values: list[dict], query: str | None = None) -> dict:
    """A sample in the per-round file format."""
    return {
        "user_input": query or " Also, ".join(f"use {t} with {json.dumps(v)}" for t, v in zip(tools, values)),
        "tools": tools,
        "function_calls": [json.dumps(v) for v in values],
    }


def write_round_files(data_dir: Path, start: int, end: int, tools: list[str], train_calls: int = 4,
                      test_calls: int = 4, n_train: int = 12, n_test: int = 4) -> None:
    """Tiny per-round files with the DESIGN.md names, for CLI tests."""
    train, test = [], []
    for i in range(n_train):
        tool = tools[i % len(tools)]
        train.append(make_sample([tool], [{"city": f"city{i}", "days": i % 5 + 1}], f"{tool} for city{i} in {i % 5 + 1} days"))
    for i in range(n_test):
        pair = [tools[i % len(tools)], tools[(i + 1) % len(tools)]]
        test.append(make_sample(pair, [{"city": f"town{i}"}, {"days": i + 1}]))
    (data_dir / "training").mkdir(parents=True, exist_ok=True)
    (data_dir / "test").mkdir(parents=True, exist_ok=True)
    (data_dir / "training" / f"function_calling_train_tools{start}-{end}_{train_calls}calls.json").write_text(json.dumps(train))
    (data_dir / "test" / f"function_calling_test_tools{start}-{end}_{test_calls}calls.json").write_text(json.dumps(test))
    descriptions = {t: {"name": t, "description": f"the {t} tool", "parameters": {}} for t in tools}
    (data_dir / f"tool_descriptions_tools{start}-{end}.json").write_text(json.dumps(descriptions))
