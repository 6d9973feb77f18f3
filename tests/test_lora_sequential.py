"""The LoRA baseline: stable text markers, the marker model's losses, decoding and checkpoints, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lora_sequential
from common import UserError, run_cli
from conftest import (TOOL_NAMES, TrainingRecorder, assert_forgetting_plot, make_sample, run_in_process,
                      write_round_files)
from dataset import NativeFunctionCallingDataset, build_answer_ids, discover_available_tools, make_dataloader
from experiment import RoundData, RoundSpec
from lora_sequential import BaselineRounds, BaselineSettings, MarkerLoRAModel, ToolMarkers
from model import LoraSettings
from replay_buffer import ReplaySettings
from settings import DataSettings, RunSettings
from training import TrainSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
ROUND_1 = ["get_weather", "convert_currency", "search_flights"]
ROUND_2 = ["calculate_bmi", "book_table", "translate_text"]


def round_samples(tools: list[str]) -> list[dict]:
    return [make_sample([tool], [{"city": f"c{i}"}]) for i, tool in enumerate(reversed(tools))]


def test_markers_number_tools_by_their_place_in_the_global_list():
    tool_names = discover_available_tools([round_samples(ROUND_1), round_samples(ROUND_2)])
    markers = ToolMarkers(tool_names)
    # Round 2's tools continue the numbering: no per-file renumbering from 1.
    assert [markers.marker(t) for t in sorted(ROUND_2)] == ["[tool_4]", "[tool_5]", "[tool_6]"]
    assert [markers.marker(t) for t in sorted(ROUND_1)] == ["[tool_1]", "[tool_2]", "[tool_3]"]
    # A later round only appends: every earlier tool keeps its marker.
    extended = ToolMarkers(discover_available_tools([round_samples(ROUND_1), round_samples(ROUND_2),
                                                     round_samples(["zeta_tool", "alpha_tool"])]))
    assert all(extended.marker(t) == markers.marker(t) for t in tool_names)
    assert extended.marker("alpha_tool") == "[tool_7]"


def test_markers_split_text_back_into_tools_and_calls():
    markers = ToolMarkers(TOOL_NAMES)
    tools, calls = markers.split('noise [tool_2]{"amount": 1} [tool_1] {"city": "Rome"}[tool_99]{}')
    assert tools == ["convert_currency", "get_weather", "[tool_99]"]
    assert calls == ['{"amount": 1}', '{"city": "Rome"}', "{}"]
    assert markers.split("no markers at all") == ([], [])
    named = ToolMarkers(TOOL_NAMES, "name")
    assert named.marker("book_table") == "[tool: book_table]"
    assert named.split('[tool: book_table]{"n": 2}[tool: unknown]{}') == (["book_table", "unknown"], ['{"n": 2}', "{}"])
    with pytest.raises(UserError, match="--marker_style"):
        ToolMarkers(TOOL_NAMES, "emoji")


@pytest.fixture(scope="module")
def marker_model(tiny_model_dir):
    torch.manual_seed(0)
    return MarkerLoRAModel(str(tiny_model_dir), TOOL_NAMES, LoraSettings(r=4, dropout=0.0), device="cpu")


def test_encode_tool_is_the_marker_text_and_the_same_in_every_round(marker_model):
    tokenizer = marker_model.tokenizer
    for index, tool in enumerate(TOOL_NAMES):
        assert tokenizer.decode(marker_model.encode_tool(tool)) == f"[tool_{index + 1}]"
    sample = make_sample(["search_flights"], [{"city": "Oslo"}])
    answer = build_answer_ids(tokenizer, sample["tools"], sample["function_calls"], marker_model.encode_tool)
    marker, call = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("[tool_3]", '{"city": "Oslo"}'))
    assert answer == marker + call + [marker_model.end_id]
    assert marker_model.parameter_breakdown()["tool_memory"] == 0 and marker_model.row_parameters() == []


def test_losses_cover_the_answer_and_the_tool_loss_the_markers(marker_model):
    samples = [make_sample(["get_weather", "book_table"], [{"city": "Paris"}, {"n": 2}]),
               make_sample(["translate_text"], [{"text": "hi"}], "translate hi into Spanish please")]
    dataset = NativeFunctionCallingDataset(samples, marker_model.tokenizer, marker_model.encode_tool, 256, "train")
    batch = next(iter(make_dataloader(dataset, 2, marker_model.tokenizer.pad_token_id, shuffle=False)))
    mask = marker_model.marker_positions(batch["labels"])
    decoded = [marker_model.tokenizer.decode(batch["labels"][row][mask[row]].tolist()) for row in range(2)]
    assert decoded == ["[tool_1][tool_5]", "[tool_6]"]
    out = marker_model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.isfinite(out.loss) and torch.isfinite(out.tool_loss)
    # The head runs only where a next label is set: one row of logits per target.
    assert out.logits.shape == (int((batch["labels"][:, 1:] != -100).sum()), len(marker_model.tokenizer))


def test_labelled_head_equals_the_full_logits_loss_and_lora_gradients(marker_model):
    samples = [make_sample(["get_weather", "book_table"], [{"city": "Paris"}, {"n": 2}]),
               make_sample(["translate_text"], [{"text": "hi"}], "translate hi into Spanish please")]
    dataset = NativeFunctionCallingDataset(samples, marker_model.tokenizer, marker_model.encode_tool, 256, "train")
    batch = next(iter(make_dataloader(dataset, 2, marker_model.tokenizer.pad_token_id, shuffle=False)))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    params = marker_model.lora_parameters()
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        generator = torch.Generator().manual_seed(3)
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    try:
        out = marker_model(ids, mask, labels)
        got = torch.autograd.grad(out.loss + 0.5 * out.tool_loss, params)
        # Reference: the peft model's full logits at every position, shifted, torch's cross-entropy.
        full = marker_model.base_model(input_ids=ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
        targets = labels[:, 1:].reshape(-1)
        per_token = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), targets,
                                                      ignore_index=-100, reduction="none")
        on_marker = marker_model.marker_positions(labels)[:, 1:].reshape(-1) & (targets != -100)
        loss, tool_loss = per_token[targets != -100].mean(), per_token[on_marker].mean()
        expected = torch.autograd.grad(loss + 0.5 * tool_loss, params)
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tool_loss, tool_loss, rtol=1e-5, atol=1e-6)
    assert len(got) == len(expected) > 0
    for got_grad, expected_grad in zip(got, expected):
        assert expected_grad.abs().sum() > 0
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_batched_left_padded_generation_equals_one_by_one(marker_model):
    with torch.no_grad():
        saved = [p.detach().clone() for p in marker_model.lora_parameters()]
        generator = torch.Generator().manual_seed(1)
        for param in marker_model.lora_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    try:
        samples = [make_sample(["get_weather"], [{"city": "Paris"}], "weather in Paris"),
                   make_sample(["convert_currency"], [{"amount": 1}], "convert 100 USD to EUR please, quickly now")]
        dataset = NativeFunctionCallingDataset(samples, marker_model.tokenizer, marker_model.encode_tool, 256, "eval")
        batch = next(iter(make_dataloader(dataset, 2, marker_model.tokenizer.pad_token_id, shuffle=False)))
        together = marker_model.generate_ids(batch["input_ids"], batch["attention_mask"], 10)
        alone = [marker_model.generate_ids(torch.tensor([item["input_ids"]]),
                                           torch.ones(1, len(item["input_ids"]), dtype=torch.long), 10)[0]
                 for item in dataset]
        assert together == alone and len(set(map(tuple, together))) == 2
    finally:
        with torch.no_grad():
            for param, value in zip(marker_model.lora_parameters(), saved):
                param.copy_(value)


def test_generated_markers_parse_back_to_tool_names(marker_model):
    ids = marker_model.tokenizer('[tool_2]{"amount": 3}[tool_6]{"text": "hi"}', add_special_tokens=False)["input_ids"]
    parsed = marker_model.parse_generated(ids + [marker_model.end_id])
    assert parsed.predicted_tools == ["convert_currency", "translate_text"]
    assert parsed.function_calls == ['{"amount": 3}', '{"text": "hi"}']


def test_checkpoint_round_trip_and_seeded_reinit(marker_model, tiny_model_dir, tmp_path):
    with torch.no_grad():
        for param in marker_model.lora_parameters():
            param.add_(0.5)
    marker_model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["lora", "markers.json"]
    assert json.loads((tmp_path / "ckpt" / "markers.json").read_text())["markers"]["get_weather"] == "[tool_1]"
    fresh = MarkerLoRAModel(str(tiny_model_dir), TOOL_NAMES, LoraSettings(r=4, dropout=0.0), device="cpu")
    fresh.load(tmp_path / "ckpt")
    for mine, theirs in zip(marker_model.lora_parameters(), fresh.lora_parameters()):
        assert torch.equal(mine, theirs)
    other = MarkerLoRAModel(str(tiny_model_dir), TOOL_NAMES[::-1], LoraSettings(r=4, dropout=0.0), device="cpu")
    with pytest.raises(UserError, match="different tools"):
        other.load(tmp_path / "ckpt")

    state = torch.get_rng_state()
    fresh.reinit_lora(seed=3)
    first = [p.detach().clone() for p in fresh.lora_parameters()]
    fresh.reinit_lora(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, fresh.lora_parameters()))
    assert torch.equal(state, torch.get_rng_state())
    lora_b = [p for n, p in fresh.base_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    marker_model.reinit_lora(seed=0)


class TokenizerOnly:
    """The part of MarkerLoRAModel the replay hooks use: a tokenizer and a tool encoder."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_tool(self, name: str) -> list[int]:
        return self.tokenizer(f"[{name}]", add_special_tokens=False)["input_ids"]


def replay_rounds(tokenizer, policy: str, capacity: int, sizes: list[int], batch_size: int = 8,
                  ratio: float = 0.25) -> tuple[BaselineRounds, list[RoundData]]:
    data = [RoundData(RoundSpec(3 * r + 1, 3 * r + 3, 1),
                      [make_sample([TOOL_NAMES[r]], [{"city": f"c{i}"}], f"round{r} query {i}") for i in range(n)],
                      [], [TOOL_NAMES[r]]) for r, n in enumerate(sizes)]
    settings = RunSettings(DataSettings("1-3:1", max_length=128), TrainSettings(batch_size=batch_size), seed=7)
    baseline = BaselineSettings(replay=ReplaySettings(capacity, ratio, policy))
    return BaselineRounds(settings, baseline, TokenizerOnly(tokenizer), data), data


def round_batches(hooks: BaselineRounds, data: list[RoundData], index: int) -> list[list[str]]:
    train = NativeFunctionCallingDataset(data[index].train, hooks.model.tokenizer, hooks.model.encode_tool, 128)
    return [batch["user_input"] for batch in hooks.make_loader(index, train, shuffle=True, seed=index)]


def test_original_replay_policy_buffer_fill_and_batches(tiny_tokenizer):
    hooks, data = replay_rounds(tiny_tokenizer, "original", capacity=15, sizes=[24, 10, 30])
    first = round_batches(hooks, data, 0)
    assert [len(b) for b in first] == [8, 8, 8] and all(q.startswith("round0") for b in first for q in b)
    # After round 1: min(24 // 2, 500) = 12 of its samples offered; batches of 8 and 2 give up int(8 * 0.25) = 2 and
    # int(2 * 0.25) = 0 new samples to replayed ones.
    second = round_batches(hooks, data, 1)
    assert len(hooks.buffer) == 12 and hooks.buffer.seen == 12
    assert {s["user_input"] for s in hooks.buffer.items} <= {s["user_input"] for s in data[0].train}
    assert [sum(q.startswith("round0") for q in b) for b in second] == [2, 0]
    assert [sum(q.startswith("round1") for q in b) for b in second] == [6, 2]
    # After round 2: 5 more offered (17 seen) to a reservoir of 15.
    third = round_batches(hooks, data, 2)
    assert len(hooks.buffer) == 15 and hooks.buffer.seen == 17
    assert [len(b) for b in third] == [8, 8, 8, 6]
    assert [sum(not q.startswith("round2") for q in b) for b in third] == [2, 2, 2, 1]
    assert sum(q.startswith("round2") for b in third for q in b) == 30 - 7


def test_a_replay_count_of_zero_replays_nothing_and_says_so(tiny_tokenizer, caplog):
    hooks, data = replay_rounds(tiny_tokenizer, "original", capacity=15, sizes=[24, 10], batch_size=2, ratio=0.2)
    with caplog.at_level("WARNING"):
        batches = round_batches(hooks, data, 1)
    assert all(q.startswith("round1") for b in batches for q in b) and len(batches) == 5
    assert "--replay_ratio 0.2 at --batch_size 2 replays no sample (original policy)" in caplog.text


def test_reservoir_replay_policy_offers_every_sample_and_keeps_every_new_one(tiny_tokenizer):
    hooks, data = replay_rounds(tiny_tokenizer, "reservoir", capacity=30, sizes=[24, 10, 30])
    round_batches(hooks, data, 0)
    second = round_batches(hooks, data, 1)
    assert len(hooks.buffer) == 24 and hooks.buffer.seen == 24
    # round(8 * 0.25) = 2 replayed beside 6 new samples per batch; all 10 new samples trained on.
    assert [sum(q.startswith("round0") for q in b) for b in second] == [2, 2]
    assert sum(q.startswith("round1") for b in second for q in b) == 10
    round_batches(hooks, data, 2)
    assert len(hooks.buffer) == 30 and hooks.buffer.seen == 34


@pytest.mark.parametrize("flags, message", [
    (["--replay_ratio", "1.5"], "argument --replay_ratio: expected a number in [0, 1]"),
    (["--replay_buffer_size", "0"], "argument --replay_buffer_size: expected a positive integer"),
    (["--use_replay_buffer", "--replay_ratio", "1", "--batch_size", "4"], "leaves none for the round's own samples"),
    (["--replay_policy", "fifo"], "argument --replay_policy: invalid choice: 'fifo'"),
])
def test_bad_replay_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lora_sequential.main, ["--training_rounds", "1-3:1", "--data_dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_two_tiny_rounds_with_replay_write_the_run_directory_and_resume_exactly(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_round_files(data, 1, 3, ROUND_1)
    write_round_files(data, 4, 6, ROUND_2)
    out = tmp_path / "run"
    args = ["--model_name", str(tiny_model_dir), "--training_rounds", "1-3:2,4-6:1", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--eval_all_previous", "--max_new_tokens", "16",
            "--device", "cpu", "--use_replay_buffer", "--replay_buffer_size", "5", "--replay_ratio", "0.5",
            "--reinit_lora_after_each_round", "--save_checkpoints", "--lora_r", "4"]
    recorder = TrainingRecorder()
    summary = run_in_process(lora_sequential.main, args, recorder)
    assert recorder.descriptions == ["round 1-3", "round 4-6"]
    printed = capsys.readouterr().out
    assert "avg_tool_f1_score" in printed and "backward transfer" in printed
    assert summary["method"] == "lora_replay" and summary["rounds"] == ["1-3", "4-6"]
    tool_f1 = summary["matrix"]["avg_tool_f1_score"]
    assert tool_f1[0][0] is not None and tool_f1[0][1] is None and None not in tool_f1[1]
    params = summary["parameters"]
    assert params["tool_memory"] == 0 and params["trainable"] == params["lora"] > 0
    assert_forgetting_plot(out / "forgetting.png")
    log = (out / "train.log").read_text()
    assert "round 2: 2 replay samples per batch of 4 (reservoir policy), from a buffer of 5 (of 12 offered)" in log
    assert "round 2: LoRA adapter re-initialised" in log
    # Re-initialised: round 2 starts from peft's fresh adapter (B zero), not from round 1's.
    second = recorder.records[1]
    assert all(torch.count_nonzero(v) == 0 for k, v in second.lora_before.items() if "lora_B" in k)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["round_1", "round_2"]
    markers = [(checkpoints / name / "markers.json").read_text() for name in ("round_1", "round_2")]
    assert markers[0] == markers[1]
    assert not list(checkpoints.rglob("model.safetensors")) and not list(out.rglob("*.tmp"))

    # Roll the run back to "round 1 finished" and resume: only round 2 trains, and the numbers repeat.
    state = json.loads((out / "state.json").read_text())
    state["completed_rounds"] = 1
    (out / "state.json").write_text(json.dumps(state))
    (out / "summary.json").unlink()
    resumed = TrainingRecorder()
    again = run_in_process(lora_sequential.main, args + ["--resume"], resumed)
    assert resumed.descriptions == ["round 4-6"]
    assert resumed.records[0].batches == second.batches
    assert again["matrix"] == summary["matrix"]
    assert again["round_stats"] == summary["round_stats"]
