"""The embedded tiny backbone: tokenizer specials and chat template, random model, caching, and a micro build."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch

import synthetic_xlam
import tiny_backbone as tb
from common import UserError
from dataset import IGNORE_INDEX, build_prompt_ids, end_of_turn_id

REPO = Path(__file__).resolve().parents[1]

NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]


def test_tokenizer_has_llama3_special_tokens_as_single_ids(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(248)]
    assert all(token in vocab for token in NAMED_SPECIALS + reserved)
    assert "<|reserved_special_token_248|>" not in vocab
    special_ids = set(tiny_tokenizer.all_special_ids) | set(tiny_tokenizer.added_tokens_decoder)
    for token in NAMED_SPECIALS + reserved:
        ids = tiny_tokenizer(f"x{token}y", add_special_tokens=False)["input_ids"]
        assert vocab[token] in ids and vocab[token] in special_ids
        assert tiny_tokenizer.convert_ids_to_tokens(vocab[token]) == token
    reserved_ids = [vocab[t] for t in reserved]
    assert reserved_ids == sorted(reserved_ids), "reserved tokens are in id order"
    assert tiny_tokenizer.bos_token == "<|begin_of_text|>"
    assert tiny_tokenizer.eos_token == "<|eot_id|>"
    assert tiny_tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert end_of_turn_id(tiny_tokenizer) == vocab["<|eot_id|>"]


def test_tokenizer_round_trips_text_and_json(tiny_tokenizer):
    text = 'Find flights from Berlin to Rome on 2024-06-10, "quoted" and ünïcode {"a": [1, 2.5]}'
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer("hi")["input_ids"][0] == tiny_tokenizer.bos_token_id


def test_chat_template_format(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi there"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    bare = tiny_tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=False)
    assert bare.endswith("hi there<|eot_id|>")
    ids = build_prompt_ids(tiny_tokenizer, "hi there")
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids) == text.split("<|start_header_id|>system")[0] + text.split("S<|eot_id|>")[1]


def test_tokenizer_saves_and_loads_back(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Convert 100 USD to EUR"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tiny_tokenizer.bos_token,
        tiny_tokenizer.eos_token,
        tiny_tokenizer.pad_token,
    )


def test_build_tokenizer_rejects_a_tiny_vocab():
    with pytest.raises(ValueError):
        tb.build_tokenizer(["abc"], vocab_size=300)


def test_random_model_config_and_forward(tiny_tokenizer):
    torch.manual_seed(0)
    model = tb.build_random_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    config = model.config
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size == len(tiny_tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tiny_tokenizer.bos_token_id,
        end_of_turn_id(tiny_tokenizer),
        tiny_tokenizer.pad_token_id,
    )
    ids = torch.tensor([build_prompt_ids(tiny_tokenizer, "What is the weather in Paris?")])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(out.loss)
    assert tb.count_parameters(model) < 1_000_000


def test_default_backbone_names():
    assert tb.DEFAULT_BACKBONE_DIR == REPO / "models" / "tiny-llama-fc"
    assert tb.DEFAULT_MODEL_NAME == str(REPO / "models" / "tiny-llama-fc")


def test_length_batches_respect_the_token_budget():
    lengths = [random.Random(i).randint(5, 60) for i in range(200)]
    batches = tb.length_batches(lengths, 256, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 256 or len(b) == 1 for b in batches)


def test_parse_memory_answer_splits_at_tool_tokens(tiny_tokenizer):
    slot = tiny_tokenizer.convert_tokens_to_ids("<|reserved_special_token_3|>")
    other = tiny_tokenizer.convert_tokens_to_ids("<|reserved_special_token_4|>")
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = [slot] + encode('{"city": "Paris"}') + [other] + encode('{"days": 3}')
    tools, calls = tb.parse_memory_answer(tiny_tokenizer, ids, {slot: "get_weather", other: "forecast"})
    assert tools == ["get_weather", "forecast"]
    assert calls == ['{"city": "Paris"}', '{"days": 3}']
    sample = {"tools": ["get_weather", "forecast"], "function_calls": ['{"city":"Paris"}', '{"days": 3.0}']}
    assert tb.score([sample], [(tools, calls)])["exact_accuracy"] == 1.0
    # eval.py's rule: calls are a multiset, so the order does not matter, a wrong tool does.
    assert tb.score([sample], [(tools[::-1], calls[::-1])])["exact_accuracy"] == 1.0
    assert tb.score([sample], [(["get_weather", "get_weather"], calls)])["tool_accuracy"] == 0.0


def test_parse_icl_answer():
    text = '{"name": "a", "arguments": {"x": 1}}\nnot json\n{"name": "b", "arguments": {}}'
    tools, calls = tb.parse_icl_answer(text)
    assert tools == ["a", "", "b"]
    assert json.loads(calls[0]) == {"x": 1}


def test_ensure_backbone_returns_a_finished_build_without_building(tmp_path, monkeypatch):
    for name in tb.FINISHED_FILES:
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(tb, "build_backbone", lambda *a, **k: pytest.fail("must not build"))
    assert tb.ensure_backbone(tmp_path) == tmp_path.resolve()


def test_a_rebuild_keeps_the_model_card_and_the_fingerprint_leaves_it_out(tmp_path, monkeypatch):
    from experiment import backbone_fingerprint

    def build(output_dir, settings):
        for name in tb.FINISHED_FILES:
            (Path(output_dir) / name).write_text('{"new": 1}')

    target = tmp_path / "backbone"
    target.mkdir()
    (target / "config.json").write_text('{"old": 1}')
    (target / tb.MODEL_CARD).write_text("# the card\n")
    monkeypatch.setattr(tb, "build_backbone", build)
    tb.ensure_backbone(target, rebuild=True)
    assert (target / tb.MODEL_CARD).read_text() == "# the card\n"
    assert json.loads((target / "config.json").read_text()) == {"new": 1}
    before = backbone_fingerprint(str(target))
    (target / tb.MODEL_CARD).write_text("# the card, edited\n")
    assert backbone_fingerprint(str(target)) == before and tb.MODEL_CARD not in before
    assert "config.json" in before


def test_failed_build_leaves_no_directory(tmp_path, monkeypatch):
    def broken(output_dir, settings):
        (Path(output_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(tb, "build_backbone", broken)
    target = tmp_path / "backbone"
    with pytest.raises(RuntimeError):
        tb.ensure_backbone(target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cli_rejects_a_file_as_output(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        tb.main(["--output", str(target)])


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--split", "bytes"], ["--icl_fraction", "1.5"],
                                  ["--fresh_value_fraction", "x"]])
def test_cli_rejects_a_bad_flag(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        tb.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_cli_rejects_a_width_the_heads_do_not_divide(tmp_path):
    with pytest.raises(UserError, match="hidden_size 130"):
        tb.main(["--output", str(tmp_path / "b"), "--hidden_size", "130"])


def test_old_reports_read_as_the_stages_they_had():
    none = tb.settings_of({"settings": {"steps": 3000}})
    assert (none.consolidation_steps, none.reading_steps) == (0, 0), "before the second stage"
    second = tb.settings_of({"settings": {"steps": 3000, "reading_steps": 7, "reading_learning_rate": 1e-3,
                                          "reading_icl_fraction": 0.0, "reading_max_length": 384}})
    assert (second.consolidation_steps, second.consolidation_learning_rate, second.reading_steps) == (7, 1e-3, 0), \
        "before the reading stage, the second stage was called reading_*"
    now = tb.settings_of({"settings": {"steps": 3000, "consolidation_steps": 5, "reading_steps": 7}})
    assert (now.consolidation_steps, now.reading_steps) == (5, 7)
    assert none.spare_tools == second.spare_tools == now.spare_tools == 0, "builds from before the spare tools"
    assert tb.settings_of({"settings": {"spare_tools": 9}}).spare_tools == 9


def test_pretraining_tools_are_ranks_201_400_then_spare_tools_in_the_reserved_tokens_left():
    import xlam_datasets

    rows = tb.load_corpus()
    ranked = xlam_datasets.rank_tools(rows)
    data = tb.pretraining_samples(0, rows, tb.BuildSettings())
    own = ranked[tb.PRETRAIN_FIRST_RANK - 1:tb.PRETRAIN_LAST_RANK]
    assert list(data.tool_slots)[:200] == own and sorted(data.tool_slots.values()) == list(range(tb.NUM_RESERVED_TOKENS))
    spare = list(data.tool_slots)[200:]
    assert len(spare) == 48 and not set(spare) & set(ranked), "no corpus row calls a spare tool"
    assert set(data.descriptions) == set(data.tool_slots)
    called = {tool for sample in data.train for tool in sample["tools"]}
    assert set(spare) <= called and not called & set(ranked[:200]), "the rounds' tools are never trained"
    objects = {tool.name: tool.domain_object for tool in synthetic_xlam.CANDIDATES}
    known = {objects[name] for name in own}
    new = [objects[name] not in known for name in spare]
    assert new == sorted(new, reverse=True) and sum(new) >= 20, "objects the corpus's tools lack come first"
    assert {"daily_calories", "credit_score", "betting_odds"} <= {objects[name] for name in spare}
    old = tb.pretraining_samples(0, rows, dataclasses.replace(tb.BuildSettings(), spare_tools=0))
    assert list(old.tool_slots) == own
    with pytest.raises(ValueError, match="spare_tools 49: only 48 reserved tokens are left"):
        dataclasses.replace(tb.BuildSettings(), spare_tools=49)


def test_cli_rejects_more_spare_tools_than_reserved_tokens_before_building(tmp_path):
    with pytest.raises(UserError, match="spare_tools 49: only 48 reserved tokens are left after the corpus's ranks 201-400"):
        tb.main(["--output", str(tmp_path / "b"), "--spare_tools", "49"])
    assert not (tmp_path / "b").exists()


def test_cli_rejects_a_reading_stage_longer_than_the_positions(tmp_path):
    with pytest.raises(UserError, match="reading_max_length 1408 exceeds max_position_embeddings 1024"):
        tb.main(["--output", str(tmp_path / "b"), "--max_position_embeddings", "1024"])
    assert not (tmp_path / "b").exists()


def test_cli_probe_needs_a_finished_build(tmp_path):
    with pytest.raises(UserError, match="no finished build"):
        tb.main(["--output", str(tmp_path), "--probe"])


def test_build_command_spells_out_the_changed_choices():
    assert tb.build_command(tb.BuildSettings()) == "python tiny_backbone.py --rebuild --steps 10000 --seed 0"
    changed = tb.BuildSettings(steps=10, seed=2, split="llama3", icl_fraction=0.1, spare_tools=0, consolidation_steps=0,
                               reading_steps=5, reading_max_length=1000, reading_name_loss_weight=2.0, threads=1)
    assert tb.build_command(changed, "x") == ("python tiny_backbone.py --rebuild --steps 10 --seed 2 --split llama3 "
                                              "--icl_fraction 0.1 --spare_tools 0 --consolidation_steps 0 --reading_steps 5 "
                                              "--reading_max_length 1000 --reading_name_loss_weight 2.0 --threads 1 "
                                              "--output x")


def micro_settings() -> tb.BuildSettings:
    return tb.BuildSettings(
        seed=3,
        vocab_size=1024,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=512,
        max_length=512,
        icl_max_listed=3,
        steps=3,
        batch_tokens=1024,
        max_samples_per_tool=2,
        train_size=40,
        test_size=8,
        eval_samples=4,
        icl_eval_samples=2,
        max_new_tokens=8,
        consolidation_steps=2,
        reading_steps=2,
        reading_max_length=512,
        reading_batch_tokens=1024,
        threads=1,
    )


def test_each_later_stage_trains_on_its_own_settings():
    settings = tb.BuildSettings(steps=10, learning_rate=1e-3, icl_fraction=0.0, consolidation_steps=3,
                                consolidation_learning_rate=5e-4, reading_steps=4, reading_icl_fraction=0.5,
                                reading_learning_rate=2e-4, reading_max_length=900, reading_batch_tokens=4096,
                                reading_name_loss_weight=3.0, max_position_embeddings=1024)
    second = settings.consolidation_stage()
    assert (second.steps, second.learning_rate, second.icl_fraction, second.max_length) == (3, 5e-4, 0.0, 384)
    reading = settings.reading_stage()
    assert (reading.steps, reading.icl_fraction, reading.learning_rate, reading.max_length, reading.batch_tokens,
            reading.name_loss_weight) == (4, 0.5, 2e-4, 900, 4096, 3.0)
    for stage in (second, reading):
        assert stage.consolidation_steps == stage.reading_steps == 0, "a stage has no later stages"
        assert stage.fresh_value_fraction == settings.fresh_value_fraction
    with pytest.raises(ValueError, match="reading_max_length 2000 exceeds max_position_embeddings 1024"):
        tb.BuildSettings(reading_steps=1, reading_max_length=2000, max_position_embeddings=1024)


def test_the_name_tokens_of_an_in_context_answer_carry_the_name_weight(tiny_tokenizer):
    sample = {"user_input": "weather in Paris, then in Rome", "tools": ["get_weather", "get_weather"],
              "function_calls": ['{"city": "Paris"}', '{"city": "Rome"}']}
    listing = [{"name": "get_weather", "description": "Weather of a city.", "parameters": {}}]
    plain = tb.encode_icl_example(tiny_tokenizer, sample, listing)
    weighted = tb.encode_icl_example(tiny_tokenizer, sample, listing, name_weight=4.0)
    assert plain.weights is None and (weighted.input_ids, weighted.labels) == (plain.input_ids, plain.labels)
    assert len(weighted.weights) == len(weighted.input_ids)
    heavy = [token for token, weight in zip(weighted.input_ids, weighted.weights) if weight == 4.0]
    assert tiny_tokenizer.decode(heavy).replace(" ", "") == "get_weatherget_weather", "both names, nothing else"
    assert all(w == 0.0 for w, label in zip(weighted.weights, weighted.labels) if label == IGNORE_INDEX)
    assert {w for w, label in zip(weighted.weights, weighted.labels) if label != IGNORE_INDEX} == {1.0, 4.0}


def test_the_weighted_loss_is_the_weighted_mean_and_plain_batches_keep_the_plain_mean(tiny_tokenizer):
    torch.manual_seed(0)
    model = tb.build_random_model(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1).eval()
    ids = build_prompt_ids(tiny_tokenizer, "hello") + [5, 6, 7, 8]
    labels = [IGNORE_INDEX] * (len(ids) - 4) + [5, 6, 7, 8]
    plain = tb.collate([tb.Example(ids, labels)], tiny_tokenizer.pad_token_id)
    assert "weights" not in plain
    ones = tb.collate([tb.Example(ids, labels, [1.0] * len(ids)), tb.Example(ids, labels)], tiny_tokenizer.pad_token_id)
    heavy = tb.collate([tb.Example(ids, labels, [0.0] * (len(ids) - 4) + [3.0, 1.0, 1.0, 1.0])],
                       tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        mean = tb.answer_loss(model, plain)
        assert torch.allclose(tb.answer_loss(model, ones), mean)
        logits = model(input_ids=plain["input_ids"]).logits[0, -5:-1]
        each = torch.nn.functional.cross_entropy(logits, torch.tensor([5, 6, 7, 8]), reduction="none")
        assert torch.allclose(mean, each.mean(), atol=1e-5)
        assert torch.allclose(tb.answer_loss(model, heavy), (3 * each[0] + each[1:].sum()) / 6, atol=1e-5)


@pytest.mark.slow
def test_micro_build_end_to_end_loads_back(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "tiny"
    path = tb.ensure_backbone(target, settings=micro_settings())
    assert path == target.resolve() and tb.is_finished_build(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny.building-")]
    report = tb.read_report(path)
    probes = (("held_out", 4), ("held_out_fresh_values", 4), ("held_out_in_context", 2),
              ("held_out_in_context_made_up_names", 2))  # eval_samples, icl_eval_samples
    for key, samples in probes:
        scores = report[key]
        assert scores["total_examples"] == samples
        hits = scores["tool_accuracy"] * samples
        assert hits == round(hits), "a share of whole samples"
        assert scores["exact_accuracy"] <= scores["tool_accuracy"], "an exact match has the right tools"
        assert 0.0 <= scores["argument_accuracy"] <= 1.0
    assert report["pretraining_ranks"][0] == tb.PRETRAIN_FIRST_RANK and len(report["spare_tools"]) == 48
    assert 0 < report["refreshed_rows"] < report["vocab_size"]
    assert report["weights_sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert report["command"] == ("python tiny_backbone.py --rebuild --steps 3 --seed 3 --icl_max_listed 3 --hidden_size 32 "
                                 "--num_layers 1 --max_position_embeddings 512 --max_length 512 --batch_tokens 1024 "
                                 "--consolidation_steps 2 --reading_steps 2 --reading_max_length 512 "
                                 "--reading_batch_tokens 1024 --threads 1")
    reprobed = tb.probe_build(path)
    assert {key: reprobed[key] for key, _ in probes} == {key: report[key] for key, _ in probes}, "the probe is pure"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|reserved_special_token_247|>") < len(tokenizer)
    ids = torch.tensor([build_prompt_ids(tokenizer, "hello")])
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    assert tb.ensure_backbone(target, settings=micro_settings()) == path
    assert os.stat(path / "model.safetensors").st_mtime_ns == stamp


def test_training_examples_put_loss_on_the_answer_only(tiny_tokenizer):
    sample = {"user_input": "weather in Paris", "tools": ["get_weather"], "function_calls": ['{"city": "Paris"}']}
    encode_tool = tb.slot_encoder(tiny_tokenizer, {"get_weather": 0})
    example = tb.encode_memory_example(tiny_tokenizer, sample, encode_tool)
    prompt = build_prompt_ids(tiny_tokenizer, "weather in Paris")
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = example.labels[len(prompt) :]
    assert answer[0] == tiny_tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert answer[-1] == end_of_turn_id(tiny_tokenizer)
    descriptions = {n: {"name": n, "description": n, "parameters": {}} for n in ["get_weather", "a", "b", "c", "d"]}
    listing = tb.icl_listing(sample, descriptions, random.Random(0), 3, 5)
    assert 3 <= len(listing) <= 5 and {"name": "get_weather", "description": "get_weather", "parameters": {}} in listing
    icl = tb.encode_icl_example(tiny_tokenizer, sample, listing)
    answer_ids = [t for t in icl.labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(answer_ids[:-1]) == '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_answer_loss_matches_the_full_head_loss(tiny_tokenizer):
    torch.manual_seed(0)
    model = tb.build_random_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    encode_tool = tb.slot_encoder(tiny_tokenizer, {"a": 0, "b": 1})
    examples = [
        tb.encode_memory_example(tiny_tokenizer, {"user_input": "x y", "tools": ["a"], "function_calls": ['{"k": 1}']}, encode_tool),
        tb.encode_memory_example(
            tiny_tokenizer, {"user_input": "longer query here", "tools": ["b", "a"], "function_calls": ["{}", '{"q": "z"}']}, encode_tool
        ),
    ]
    batch = tb.collate(examples, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).loss
        assert torch.allclose(tb.answer_loss(model, batch), expected, atol=1e-5)


WORDS = ["river", "quota", "maple", "lantern", "orbit"]


def test_fresh_value_keeps_the_shape_of_a_value():
    rng = random.Random(0)
    for text in ["2024-06-10", "ACC-262523", "New York", "The Hidden Orchard", "437009.72", "i-0a3f", "x@y.io"]:
        fresh = tb.fresh_value_like(text, rng, WORDS)
        assert [c.isdigit() for c in fresh if not c.isalpha()] == [c.isdigit() for c in text if not c.isalpha()]
        assert [c for c in fresh if not c.isalnum()] == [c for c in text if not c.isalnum()], (text, fresh)
        assert fresh.split(" ")[0][:1].isupper() == text[:1].isupper()
        assert len(fresh.split(" ")) == len(text.split(" "))
    assert tb.fresh_value_like("2024", rng, WORDS)[0] != "0", "a leading digit stays non-zero"


def test_fresh_values_change_query_and_calls_together():
    sample = {
        "user_input": "Find flights from Berlin to Rome on 2024-06-10 for 3 adults, economy please.",
        "tools": ["search_flights"],
        "function_calls": ['{"origin": "Berlin", "destination": "Rome", "date": "2024-06-10", "adults": 3, '
                           '"cabin": "economy", "nonstop": true, "currency": "EUR"}'],
    }
    for seed in range(20):
        fresh = tb.with_fresh_values(sample, random.Random(seed), WORDS)
        old, new = json.loads(sample["function_calls"][0]), json.loads(fresh["function_calls"][0])
        assert list(new) == list(old) and fresh["tools"] == sample["tools"]
        assert new["nonstop"] is True and new["currency"] == "EUR", "values the query does not state stay"
        assert isinstance(new["adults"], int)
        for key in ("origin", "destination", "date", "adults", "cabin"):
            text = new[key] if isinstance(new[key], str) else str(new[key])
            assert text in fresh["user_input"], (key, fresh)
        assert fresh["user_input"].startswith("Find flights from ") and fresh["user_input"].endswith(" please.")
    assert sum(tb.with_fresh_values(sample, random.Random(s), WORDS) != sample for s in range(20)) == 20


def test_made_up_names_are_the_same_in_the_list_and_the_answer():
    sample = {"user_input": "q", "tools": ["b", "a", "b"], "function_calls": ["{}", "{}", "{}"]}
    listing = [{"name": n, "description": f"does {n}", "parameters": {}} for n in ["a", "c", "b"]]
    new_sample, new_listing = tb.renamed(sample, listing, random.Random(0), WORDS)
    names = {old["name"]: new["name"] for old, new in zip(listing, new_listing)}
    assert new_sample["tools"] == [names["b"], names["a"], names["b"]]
    assert [d["description"] for d in new_listing] == [d["description"] for d in listing]
    assert all(set(name.split("_")) <= set(WORDS) for name in names.values())


def test_argument_accuracy_counts_gold_values_by_position():
    samples = [{"tools": ["t", "u"], "function_calls": ['{"a": 1, "b": "x"}', '{"c": 2.0}']},
               {"tools": ["t"], "function_calls": ['{"a": 5, "b": "y", "d": true}']}]
    predictions = [(["t", "u"], ['{"a": 1, "b": "z"}', '{"c": 2}']), (["t"], ["not json"])]
    assert tb.argument_accuracy(samples, predictions) == pytest.approx(2 / 6)


def test_the_words_split_tokenizes_a_value_alike_in_query_and_json():
    texts = ["Weather in Oslo tomorrow?", '{"city": "Oslo"}', "get_weather_forecast for Oslo"] * 50
    for split, alike in (("words", True), ("llama3", False)):
        tokenizer = tb.build_tokenizer(texts, vocab_size=900, split=split)
        value = tokenizer("Oslo", add_special_tokens=False)["input_ids"]
        query = tokenizer("Weather in Oslo tomorrow?", add_special_tokens=False)["input_ids"]
        answer = tokenizer('{"city": "Oslo"}', add_special_tokens=False)["input_ids"]
        contains = [any(ids[i:i + len(value)] == value for i in range(len(ids))) for ids in (query, answer)]
        assert all(contains) == alike, (split, tokenizer.convert_ids_to_tokens(query), tokenizer.convert_ids_to_tokens(answer))
    with pytest.raises(ValueError, match="split"):
        tb.build_tokenizer(texts, vocab_size=900, split="bytes")


def test_the_committed_backbone_matches_its_report():
    path = tb.DEFAULT_BACKBONE_DIR
    assert tb.is_finished_build(path), "models/tiny-llama-fc is committed"
    weights = path / "model.safetensors"
    report = tb.read_report(path)
    assert weights.stat().st_size <= 10 * 2**20
    assert report["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    settings = tb.settings_of(report)
    assert settings == tb.BuildSettings(), "the committed backbone is the default recipe"
    assert report["command"] == tb.build_command(settings) == "python tiny_backbone.py --rebuild --steps 10000 --seed 0"
    assert report["train_seconds"] > 0
    assert report["held_out"]["total_examples"] == settings.eval_samples
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    assert config.max_position_embeddings == settings.max_position_embeddings
    assert config.hidden_size == settings.hidden_size and config.num_hidden_layers == settings.num_layers
    assert len(AutoTokenizer.from_pretrained(path)) == report["vocab_size"] == config.vocab_size


def test_unseen_tokens_get_distinct_fresh_rows_and_seen_ones_keep_theirs(tiny_tokenizer):
    torch.manual_seed(0)
    model = tb.build_random_model(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    rows = model.get_input_embeddings().weight
    first_special = min(tiny_tokenizer.convert_tokens_to_ids(list(tb.LLAMA3_SPECIAL_TOKENS)))
    seen = set(range(0, first_special, 2))
    with torch.no_grad():
        rows[1:first_special:2] = rows[1]  # collapsed onto one row, as pretraining leaves unused tokens
    before = rows.detach().clone()
    assert tb.refresh_unseen_rows(model, tiny_tokenizer, seen, seed=0) == len(range(1, first_special, 2))
    after = rows.detach()
    assert torch.equal(after[sorted(seen)], before[sorted(seen)]), "seen rows are kept"
    assert torch.equal(after[first_special:], before[first_special:]), "special tokens are kept"
    unseen = after[1:first_special:2]
    cosine = torch.nn.functional.normalize(unseen, dim=-1) @ torch.nn.functional.normalize(unseen, dim=-1).T
    assert cosine.fill_diagonal_(0).max() < 0.9, "fresh rows point in different directions"
    assert model.get_output_embeddings().weight.data_ptr() == rows.data_ptr(), "the head is tied to them"
    again = tb.build_random_model(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    again.get_input_embeddings().weight.data.copy_(before)
    tb.refresh_unseen_rows(again, tiny_tokenizer, seen, seed=0)
    assert torch.equal(again.get_input_embeddings().weight, after), "seeded"
