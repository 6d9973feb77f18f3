"""The original toolkit's behaviours as named choices, and the bugs fixed on the way (issue: faithful reproduction)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import training
from common import UserError
from conftest import TOOL_NAMES, make_sample, write_round_files
from dataset import (CHAT_DATE_STRING, NativeFunctionCallingDataset, build_prompt_text, check_prompt_format,
                     make_dataloader)
from experiment import RoundSpec, load_round_data
from model import FunctionCallingModel
from training import TrainSettings, accumulation_group_size, train_round

# A chat template shaped like Llama-3.2's: it writes today's date unless `date_string` is given.
DATED_TEMPLATE = (
    "{{ bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = 'never' %}{%- endif %}"
    "{%- endif %}<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_chat_prompt_carries_a_fixed_date_not_todays(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = DATED_TEMPLATE
    text = build_prompt_text(tokenizer, "What is the weather in Paris?")
    assert f"Today Date: {CHAT_DATE_STRING}<|eot_id|>" in text
    # Without the fixed date the template would have written the day the test runs.
    free = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert CHAT_DATE_STRING not in free and "Today Date: " in free


def test_original_prompt_is_the_hand_written_llama3_turns(tiny_tokenizer):
    text = build_prompt_text(tiny_tokenizer, "Book a table", prompt_format="original")
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\nBook a table<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>")
    with pytest.raises(UserError, match="no system turn"):
        build_prompt_text(tiny_tokenizer, "q", system_prompt="tools", prompt_format="original")


def test_original_prompt_needs_llama3_header_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(UserError, match="needs a Llama-3 tokenizer; this one lacks <\\|begin_of_text\\|>"):
        check_prompt_format(plain, "original")


def test_accumulation_groups_end_with_the_epochs_partial_group():
    # 5 batches, groups of 2: steps after batches 2, 4 and the flush after 5 (a group of one).
    assert [accumulation_group_size(i, 5, 2) for i in range(5)] == [2, 2, 2, 2, 1]
    assert [accumulation_group_size(i, 3, 4) for i in range(3)] == [3, 3, 3]


def test_schedule_length_equals_the_optimizer_steps_taken(tiny_model_dir, monkeypatch):
    model = FunctionCallingModel(str(tiny_model_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu")
    samples = [make_sample([TOOL_NAMES[i % 3]], [{"n": i}], f"query {i}") for i in range(10)]
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, 64, "train")
    loader = make_dataloader(data, 2, model.tokenizer.pad_token_id, shuffle=False)  # 5 batches
    seen = {}
    real = training.get_linear_schedule_with_warmup

    def spy(optimizer, warmup, total):
        seen["total"] = total
        scheduler = real(optimizer, warmup, total)
        seen["scheduler"] = scheduler
        return scheduler

    monkeypatch.setattr(training, "get_linear_schedule_with_warmup", spy)
    stats = train_round(model, loader, TrainSettings(epochs=2, gradient_accumulation_steps=2))
    assert stats.steps == 6 == seen["total"]  # 3 optimizer steps per epoch (2 + 2 + the flushed 1)
    # Every step ran with a positive rate: the schedule only reaches 0 after the last step.
    assert seen["scheduler"].last_epoch == 6


def test_partial_group_gradient_is_averaged_over_its_own_size(tiny_model_dir):
    """A flushed group of one batch gives that batch's own gradient, not half of it."""
    model = FunctionCallingModel(str(tiny_model_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu")
    sample = make_sample([TOOL_NAMES[0]], [{"n": 1}], "query one")
    data = NativeFunctionCallingDataset([sample], model.tokenizer, model.encode_tool, 64, "train")
    batch = next(iter(make_dataloader(data, 1, model.tokenizer.pad_token_id, shuffle=False)))
    loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    expected = torch.autograd.grad(loss, model.memory.input_rows)[0]

    grads = []
    original_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        grads.append(model.memory.input_rows.grad.clone())
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = record
    try:
        train_round(model, make_dataloader(data, 1, model.tokenizer.pad_token_id, shuffle=False),
                    TrainSettings(epochs=1, gradient_accumulation_steps=4, max_grad_norm=0.0))
    finally:
        torch.optim.AdamW.step = original_step
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-7)


def _rows_model(tiny_model_dir, decouple: bool) -> FunctionCallingModel:
    model = FunctionCallingModel(str(tiny_model_dir), 4, TOOL_NAMES[:4], device="cpu", decouple_embeddings=decouple)
    with torch.no_grad():
        for rows in model.row_parameters():
            rows.copy_(torch.arange(1, 5, dtype=torch.float32).unsqueeze(1) * torch.eye(4, rows.shape[1])[:4] * 3)
    return model


@pytest.mark.parametrize("rows", ["all", "output"])
def test_renormalisation_rows(tiny_model_dir, rows):
    model = _rows_model(tiny_model_dir, decouple=True)
    active = torch.tensor([True, True, False, False])
    training._renormalize_active_rows(model, active, rows)
    # Row norms were 3, 6, 9, 12: the active rows go to the mean of the inactive ones, (9 + 12) / 2.
    output_norms = model.memory.decoupled_output_rows.norm(dim=-1).tolist()
    assert output_norms == pytest.approx([10.5, 10.5, 9.0, 12.0])
    input_norms = model.memory.input_rows.norm(dim=-1).tolist()
    assert input_norms == pytest.approx([10.5, 10.5, 9.0, 12.0] if rows == "all" else [3.0, 6.0, 9.0, 12.0])


def test_unit_initialisation_and_model_dtype_rows(tiny_model_dir):
    model = FunctionCallingModel(str(tiny_model_dir), 4, TOOL_NAMES[:4], device="cpu", dtype="bfloat16",
                                 memory_dtype="model")
    model.initialize_rows(seed=3, norm="unit")
    assert model.memory.input_rows.dtype == torch.bfloat16
    assert model.memory.input_rows.float().norm(dim=-1).tolist() == pytest.approx([1.0] * 4, abs=1e-2)
    gram = model.memory.input_rows.float() @ model.memory.input_rows.float().t()
    torch.testing.assert_close(gram, torch.eye(4), atol=2e-2, rtol=0)
    default = FunctionCallingModel(str(tiny_model_dir), 4, TOOL_NAMES[:4], device="cpu", dtype="bfloat16")
    assert default.memory.input_rows.dtype == torch.float32
    embedding_norm = default.causal_lm.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
    assert default.memory.input_rows.norm(dim=-1).tolist() == pytest.approx([embedding_norm] * 4, rel=1e-4)


def test_test_set_naming_an_untrained_tool_is_refused(tmp_path):
    write_round_files(tmp_path, 1, 3, ["get_weather", "convert_currency", "search_flights"])
    train_path = tmp_path / "training" / "function_calling_train_tools1-3_4calls.json"
    train = [s for s in json.loads(train_path.read_text()) if s["tools"] != ["search_flights"]]
    train_path.write_text(json.dumps(train))
    with pytest.raises(UserError, match="names tool\\(s\\) with no training sample .*: search_flights$"):
        load_round_data(tmp_path, RoundSpec(1, 3, 1), 4, 4)


def test_resume_refuses_a_run_whose_prompt_would_differ(tmp_path):
    from experiment import RunDirectory

    args = {"training_rounds": "1-3:1", "seed": 1}
    run = RunDirectory(tmp_path / "run", "tokmem", args, [RoundSpec(1, 3, 1)], resume=False)
    run.record_inputs([], "<|start_header_id|>system<|end_header_id|>\n\nToday Date: 25 Nov 2026 query")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["prompt_sample"].endswith("2026 query")
    resumed = RunDirectory(tmp_path / "run", "tokmem", args, [RoundSpec(1, 3, 1)], resume=True)
    resumed.record_inputs([], "<|start_header_id|>system<|end_header_id|>\n\nToday Date: 25 Nov 2026 query")
    later = RunDirectory(tmp_path / "run", "tokmem", args, [RoundSpec(1, 3, 1)], resume=True)
    with pytest.raises(UserError, match=r"another prompt .*was '5 Nov 2026 query', now '7 Nov 2026 query'"):
        later.record_inputs([], "<|start_header_id|>system<|end_header_id|>\n\nToday Date: 27 Nov 2026 query")
