"""More tools than a Llama-3 style tokenizer has reserved special tokens: the tools past them get new special tokens,
the embedding and LM head grow (tied and untied), and a run trains, saves, resumes and decodes with them.

The tokenizer is the tiny Llama-3 one with only its first two reserved tokens left (the others renamed), so the six
tools of `two_round_data` cross the boundary inside round 1 at the cost of a 248-tool run's 249th tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main_sequential
from common import UserError
from conftest import TOOL_NAMES, TrainingRecorder, numbers, run_in_process
from model import ADDED_TOOL_TOKEN, FunctionCallingModel, LoraSettings, reserved_token_ids

RESERVED_LEFT = 2


def keep_reserved_tokens(path: Path, count: int) -> None:
    """Rename every `<|reserved_special_token_N|>` with N >= count in the saved tokenizer at `path`."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = path / name
        text = file.read_text(encoding="utf-8")
        for index in range(count, 248):
            text = text.replace(f"<|reserved_special_token_{index}|>", f"<|renamed_special_token_{index}|>")
        file.write_text(text, encoding="utf-8")


def few_reserved_backbone(path: Path, tokenizer, tied: bool) -> Path:
    """A random tiny Llama (tied or untied) whose Llama-3 style tokenizer keeps only RESERVED_LEFT reserved tokens."""
    from transformers import LlamaForCausalLM

    from tiny_backbone import build_config

    config = build_config(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    keep_reserved_tokens(path, RESERVED_LEFT)
    return path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return few_reserved_backbone(tmp_path_factory.mktemp("few_reserved_untied"), tiny_tokenizer, tied=False)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return few_reserved_backbone(tmp_path_factory.mktemp("few_reserved_tied"), tiny_tokenizer, tied=True)


@pytest.mark.parametrize("tied", [False, True])
def test_tools_past_the_reserved_tokens_get_new_tokens_and_the_vocabulary_grows(tied, tied_dir, untied_dir):
    path = tied_dir if tied else untied_dir
    model = FunctionCallingModel(str(path), len(TOOL_NAMES), TOOL_NAMES, device="cpu",
                                 lora_config=LoraSettings(r=2, alpha=4, dropout=0.0))
    reserved = reserved_token_ids(model.tokenizer)
    assert len(reserved) == RESERVED_LEFT
    base_vocab = model.tokenizer.convert_tokens_to_ids(ADDED_TOOL_TOKEN.format(0))
    ids = [model.get_tool_token_id(name) for name in TOOL_NAMES]
    assert ids == reserved + list(range(base_vocab, base_vocab + len(TOOL_NAMES) - RESERVED_LEFT))
    embeddings, head = model.causal_lm.get_input_embeddings().weight, model.causal_lm.get_output_embeddings().weight
    assert embeddings.shape[0] == head.shape[0] == base_vocab + 4 == len(model.tokenizer)
    assert (embeddings.data_ptr() == head.data_ptr()) == tied
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "rows" not in n)
    scores = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits
    expected = model.memory.tool_logits(model.causal_lm.get_decoder()(inputs_embeds=model.embed(torch.tensor([ids])))
                                        .last_hidden_state)
    assert torch.allclose(scores[..., ids], expected, atol=1e-5), "every tool column, added or reserved, is its row"


def test_a_checkpoint_with_added_tool_tokens_loads_into_a_fresh_model(untied_dir, tmp_path):
    model = FunctionCallingModel(str(untied_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu")
    model.initialize_rows(seed=3)
    model.save(tmp_path / "checkpoint")
    fresh = FunctionCallingModel(str(untied_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu")
    fresh.load(tmp_path / "checkpoint")
    assert torch.equal(fresh.memory.input_rows, model.memory.input_rows)
    assert fresh.tool_token_ids.tolist() == model.tool_token_ids.tolist()
    meta = json.loads((tmp_path / "checkpoint" / "tool_memory.json").read_text())
    meta["tool_token_ids"][-1] += 1
    (tmp_path / "checkpoint" / "tool_memory.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="other token ids than this model's tokenizer"):
        fresh.load(tmp_path / "checkpoint")


def cli_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:1,4-6:1", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--eval_all_previous", "--max_new_tokens", "8",
            "--use_lora", "--save_checkpoints", "--use_ground_truth_tools", "--device", "cpu", "--seed", "5"]


@pytest.mark.slow
def test_a_run_past_the_reserved_tokens_trains_saves_resumes_and_decodes(untied_dir, two_round_data, tmp_path):
    whole = run_in_process(main_sequential.main, cli_args(untied_dir, two_round_data, tmp_path / "whole"),
                           TrainingRecorder())
    args = cli_args(untied_dir, two_round_data, tmp_path / "resumed")
    assert run_in_process(main_sequential.main, args, TrainingRecorder(stop_at="round 4-6")) is None
    recorder = TrainingRecorder()
    resumed = run_in_process(main_sequential.main, args + ["--resume"], recorder)
    assert recorder.descriptions == ["round 4-6"]
    assert numbers(resumed) == numbers(whole)
    checkpoint = tmp_path / "whole" / "checkpoints" / "round_2"
    meta = json.loads((checkpoint / "tool_memory.json").read_text())
    assert len(meta["tool_token_ids"]) == 6 and meta["tool_token_ids"][RESERVED_LEFT:] == list(
        range(meta["tool_token_ids"][RESERVED_LEFT], meta["tool_token_ids"][RESERVED_LEFT] + 4))
    rows = load_file(str(checkpoint / "tool_memory.safetensors"))["input_rows"]
    assert rows.shape == (6, 32)
    # Gold tools forced into the tool positions come back as their names, added tokens as reserved ones: each test
    # answer's first tool (8 new tokens leave the random backbone's first call open, so its second is never placed).
    assert whole["ground_truth_tools_matrix"]["avg_tool_f1_score"] == [[pytest.approx(2 / 3), None], [pytest.approx(2 / 3)] * 2]
