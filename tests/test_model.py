"""FunctionCallingModel on a tiny random Llama: gradients, masking, logits, checkpoints, generation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from common import UserError
from conftest import TOOL_NAMES, make_sample
from dataset import NativeFunctionCallingDataset, left_pad_collate, make_dataloader
from decoding import ToolForcingProcessor
from model import CallingOutput, FunctionCallingModel, LoraSettings, labelled_losses, reserved_token_ids
from sequential import active_tool_mask
from training import TrainSettings, train_round

SAMPLES = [
    make_sample(["get_weather"], [{"city": "Paris"}]),
    make_sample(["convert_currency", "get_weather"], [{"amount": 3}, {"city": "Rome"}]),
    make_sample(["search_flights", "book_table", "get_weather"], [{"a": 1}, {"b": 2}, {"c": "x"}]),
]


def build(model_dir, **kwargs) -> FunctionCallingModel:
    model = FunctionCallingModel(str(model_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu", **kwargs)
    model.initialize_rows(seed=1)
    return model


def train_batch(model, samples=SAMPLES):
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, mode="train")
    return left_pad_collate([data[i] for i in range(len(data))], model.tokenizer.pad_token_id)


def eval_batch(model, samples=SAMPLES):
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, mode="eval")
    return left_pad_collate([data[i] for i in range(len(data))], model.tokenizer.pad_token_id)


def test_tools_map_onto_reserved_tokens_in_id_order(tiny_model_dir):
    model = build(tiny_model_dir)
    reserved = reserved_token_ids(model.tokenizer)
    assert [model.get_tool_token_id(t) for t in TOOL_NAMES] == reserved[: len(TOOL_NAMES)]
    assert model.tokenizer.convert_ids_to_tokens(model.get_tool_token_id("get_weather")) == "<|reserved_special_token_0|>"
    assert model.get_tool_name_from_token_id(reserved[2]) == "search_flights"
    assert model.get_tool_name_from_token_id(5) is None


def test_only_rows_and_lora_receive_gradient(tiny_model_dir):
    model = build(tiny_model_dir, lora_config=LoraSettings(r=4, target_modules=("q_proj", "v_proj")))
    batch = train_batch(model)
    model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "memory.input_rows" in with_grad
    assert any("lora_" in n for n in with_grad)
    assert all(n == "memory.input_rows" or "lora_" in n for n in with_grad)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n and n != "memory.input_rows"]
    assert frozen and not any(p.requires_grad for p in frozen)
    breakdown = model.parameter_breakdown()
    assert breakdown["trainable"] == breakdown["tool_memory"] + breakdown["lora"]
    assert breakdown["tool_memory"] == len(TOOL_NAMES) * 64


def hand_made_rows(norms: list[float], hidden: int) -> torch.Tensor:
    """Orthogonal rows (basis vectors) with the given norms: the mean of their norms is known in advance."""
    return torch.stack([torch.eye(hidden)[i] * norm for i, norm in enumerate(norms)])


@pytest.mark.parametrize("rows, renormalised", [("all", (True, True)), ("output", (False, True))])
def test_training_keeps_inactive_rows_and_renormalises_active_rows_to_their_mean_norm(tiny_model_dir, rows,
                                                                                     renormalised):
    model = build(tiny_model_dir, decouple_embeddings=True)
    active = torch.tensor([name in ("get_weather", "convert_currency") for name in TOOL_NAMES])
    # Input rows: the inactive ones have norms 2, 4, 6, 8, so the target is their mean norm 5 (the norm of their mean
    # row is 2.74, the active rows' mean norm 7, all rows' 5.67). Output rows: inactive mean norm (1+2+3+6)/4 = 3.
    input_norms = {"get_weather": 3.0, "convert_currency": 11.0, "search_flights": 2.0, "calculate_bmi": 4.0,
                   "book_table": 6.0, "translate_text": 8.0}
    output_norms = {"get_weather": 7.0, "convert_currency": 7.5, "search_flights": 1.0, "calculate_bmi": 2.0,
                    "book_table": 3.0, "translate_text": 6.0}
    with torch.no_grad():
        model.memory.input_rows.copy_(hand_made_rows([input_norms[n] for n in TOOL_NAMES], 64))
        model.memory.decoupled_output_rows.copy_(hand_made_rows([output_norms[n] for n in TOOL_NAMES], 64).flip(-1))
    before = [tensor.detach().clone() for tensor in model.row_parameters()]
    data = NativeFunctionCallingDataset(SAMPLES, model.tokenizer, model.encode_tool, mode="train")
    loader = make_dataloader(data, 2, model.tokenizer.pad_token_id, shuffle=True)
    settings = TrainSettings(epochs=2, lr=1e-2, renorm_active_tools=True, renorm_rows=rows)
    stats = train_round(model, loader, settings, active)
    assert stats.steps == 4  # 3 samples in batches of 2, two epochs
    for old, tensor, target, scaled in zip(before, model.row_parameters(), (5.0, 3.0), renormalised):
        assert torch.equal(old[~active], tensor.detach()[~active])
        assert all(not torch.equal(a, b) for a, b in zip(old[active], tensor.detach()[active]))
        norms = tensor.detach()[active].norm(dim=-1)
        # Four Adam steps of 1e-2 move a 64-wide row by well under 1 in norm: unscaled rows stay near 3 and 11.
        assert torch.allclose(norms, torch.full_like(norms, target), rtol=1e-5) == scaled, (norms, target)


def test_without_renormalisation_active_rows_keep_their_own_norms(tiny_model_dir):
    model = build(tiny_model_dir)
    active = torch.tensor([name == "get_weather" for name in TOOL_NAMES])
    with torch.no_grad():
        model.memory.input_rows.copy_(hand_made_rows([3.0, 2.0, 4.0, 6.0, 8.0, 10.0], 64))
    data = NativeFunctionCallingDataset(SAMPLES[:1], model.tokenizer, model.encode_tool, mode="train")
    train_round(model, make_dataloader(data, 1, model.tokenizer.pad_token_id, False),
                TrainSettings(epochs=1, lr=1e-3), active)
    assert abs(float(model.memory.input_rows.detach()[0].norm()) - 3.0) < 0.1, "one small step, no jump to norm 6"


def test_active_tool_mask_marks_exactly_the_rounds_tools(tiny_model_dir):
    model = build(tiny_model_dir)
    mask = active_tool_mask(model, ["book_table", "get_weather"])
    assert mask.tolist() == [True, False, False, False, True, False]
    assert active_tool_mask(SimpleNamespace(row_parameters=lambda: []), ["book_table"]) is None


def test_loss_is_the_mean_cross_entropy_over_the_answer_tokens_only(tiny_model_dir):
    model = build(tiny_model_dir)
    batch = train_batch(model)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        full = model(batch["input_ids"], batch["attention_mask"])  # every position's logits, no labels
    log_probs = full.logits.float().log_softmax(-1)
    tool_ids = set(model.tool_token_ids.tolist())
    answer, tools = [], []
    for row in range(batch["input_ids"].shape[0]):
        for position in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][row, position])
            if label != -100:
                answer.append(-float(log_probs[row, position - 1, label]))
                if label in tool_ids:
                    tools.append(answer[-1])
    # Per sample, the answer is one tool token and the argument JSON's tokens per call, then the end of turn.
    text_tokens = [len(model.tokenizer(call, add_special_tokens=False)["input_ids"])
                   for sample in SAMPLES for call in sample["function_calls"]]
    assert len(answer) == sum(text_tokens) + sum(len(s["tools"]) for s in SAMPLES) + len(SAMPLES)
    assert len(tools) == sum(len(s["tools"]) for s in SAMPLES)
    assert float(out.loss) == pytest.approx(sum(answer) / len(answer), rel=1e-5)
    assert float(out.tool_loss) == pytest.approx(sum(tools) / len(tools), rel=1e-5)


def test_tool_logit_is_hidden_dot_row_and_input_is_its_row(tiny_model_dir):
    model = build(tiny_model_dir)
    batch = eval_batch(model)
    ids = batch["input_ids"].clone()
    ids[:, -1] = model.get_tool_token_id("book_table")
    embedded = model.embed(ids)
    assert torch.equal(embedded[:, -1], model.memory.input_rows[TOOL_NAMES.index("book_table")].detach().expand(len(ids), -1))
    with torch.no_grad():
        hidden = model.causal_lm.get_decoder()(
            inputs_embeds=embedded, attention_mask=batch["attention_mask"],
            position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
        ).last_hidden_state
        logits = model(ids, batch["attention_mask"]).logits
    for slot, name in enumerate(TOOL_NAMES):
        expected = hidden @ model.memory.input_rows[slot]
        assert torch.allclose(logits[..., model.get_tool_token_id(name)], expected, atol=1e-5)
    other = 7
    assert torch.allclose(logits[..., other], model.causal_lm.get_output_embeddings()(hidden)[..., other], atol=1e-5)


def reference_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-logits computation, written out here: tool rows put into the embeddings one tool at a time, one pass
    over the whole sequence, the LM head at every position with the tool columns replaced, then the cross-entropy of
    the shifted logits (mean over labelled tokens; the tool loss over tool-token targets)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    embeddings = model.causal_lm.get_input_embeddings()(ids)
    for slot, token_id in enumerate(model.tool_token_ids.tolist()):
        row = model.memory.input_rows[slot].to(embeddings.dtype)
        embeddings = torch.where((ids == token_id).unsqueeze(-1), row, embeddings)
    hidden = model.causal_lm.get_decoder()(
        inputs_embeds=embeddings, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
    ).last_hidden_state
    logits = model.causal_lm.get_output_embeddings()(hidden).float().clone()
    logits[..., model.tool_token_ids] = hidden.float() @ model.memory.output_rows.float().t()
    targets = labels[:, 1:].reshape(-1)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                                                  ignore_index=-100, reduction="none")
    labelled = targets != -100
    is_tool = labelled & torch.isin(targets, model.tool_token_ids)
    return per_token[labelled].mean(), per_token[is_tool].mean(), logits


def _gradients(objective: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(objective, params))


@pytest.mark.parametrize("decouple, use_lora", [(False, False), (True, False), (False, True)],
                         ids=["coupled", "decoupled", "coupled-lora"])
def test_labelled_head_equals_the_full_logits_loss_and_gradients(tiny_model_dir, decouple, use_lora):
    lora = LoraSettings(r=4, dropout=0.0) if use_lora else None
    model = build(tiny_model_dir, decouple_embeddings=decouple, lora_config=lora)
    if use_lora:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(2)
            for param in model.lora_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    batch = train_batch(model)
    ids, labels = batch["input_ids"], batch["labels"]
    # Without LoRA the prompt before the batch's first tool token runs without autograd; with it, nothing does.
    assert (model.constant_prefix_length(ids) > 0) != use_lora
    params = model.row_parameters() + model.lora_parameters()
    assert len(params) == (2 if decouple else 1) + (16 if use_lora else 0)  # 2 layers x 4 modules x (A, B)
    model.train()
    out = model(ids, batch["attention_mask"], labels)
    # The tool loss weighted apart from the loss, so the per-token gradients are not all equal.
    got = _gradients(out.loss + 0.5 * out.tool_loss, params)
    loss, tool_loss, full_logits = reference_losses(model, batch)
    expected = _gradients(loss + 0.5 * tool_loss, params)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tool_loss, tool_loss, rtol=1e-5, atol=1e-6)
    rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    assert out.logits.shape == (int((labels[:, 1:] != -100).sum()), full_logits.shape[-1])
    torch.testing.assert_close(out.logits.detach(), full_logits[rows, positions].detach(), rtol=1e-5, atol=1e-5)
    for got_grad, expected_grad in zip(got, expected):
        assert expected_grad.abs().sum() > 0
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_labelled_losses_gradients_through_the_losses_and_the_returned_logits():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator)
    hidden = torch.randn(7, 8, generator=generator).requires_grad_()
    rows = torch.randn(3, 8, generator=generator).requires_grad_()
    tool_ids = torch.tensor([4, 9, 20])
    targets = torch.tensor([9, 1, 20, 33, 4, 0, 49])
    is_tool = torch.isin(targets, tool_ids)
    probe = torch.randn(7, 50, generator=generator)

    def reference(use_loss: bool) -> list[torch.Tensor]:
        logits = torch.nn.functional.linear(hidden, weight).clone()
        logits[:, tool_ids] = hidden @ rows.t()
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        objective = (logits * probe).sum()
        if use_loss:
            objective = objective + per_token.mean() + 0.3 * per_token[is_tool].mean()
        return list(torch.autograd.grad(objective, [hidden, rows]))

    for use_loss in (True, False):
        logits, loss, tool_loss = labelled_losses(torch.nn.functional.linear(hidden, weight), targets, is_tool,
                                                  tool_ids, hidden @ rows.t())
        objective = (logits * probe).sum() + ((loss + 0.3 * tool_loss) if use_loss else 0.0)
        for got, expected in zip(torch.autograd.grad(objective, [hidden, rows]), reference(use_loss)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_labelled_losses_without_labels_are_zero_and_backward_runs_once(tiny_model_dir):
    model = build(tiny_model_dir)
    batch = train_batch(model)
    unlabelled = torch.full_like(batch["labels"], -100)
    out = model(batch["input_ids"], batch["attention_mask"], unlabelled)
    assert out.loss.item() == 0.0 and out.tool_loss.item() == 0.0 and out.logits.shape[0] == 0
    out.loss.backward()
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        out.loss.backward()


@pytest.mark.parametrize("memory_dtype", ["model", "float32"])
def test_bfloat16_backbone_trains_rows_of_either_precision(tiny_model_dir, memory_dtype):
    model = build(tiny_model_dir, dtype="bfloat16", memory_dtype=memory_dtype)
    row_dtype = torch.bfloat16 if memory_dtype == "model" else torch.float32
    assert model.memory.input_rows.dtype == row_dtype
    batch = train_batch(model)
    model.train()
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert out.logits.dtype == torch.float32
    (grad,) = _gradients(out.loss, model.row_parameters())
    loss, tool_loss, _ = reference_losses(model, batch)
    (expected,) = _gradients(loss, model.row_parameters())
    assert grad.dtype == row_dtype
    torch.testing.assert_close(out.loss, loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(out.tool_loss, tool_loss, rtol=2e-2, atol=0)
    cosine = torch.nn.functional.cosine_similarity(grad.float().flatten(), expected.float().flatten(), dim=0)
    assert cosine > 0.99
    model.eval()
    data = NativeFunctionCallingDataset(SAMPLES, model.tokenizer, model.encode_tool, mode="train")
    before = model.memory.input_rows.detach().clone()
    stats = train_round(model, make_dataloader(data, 3, model.tokenizer.pad_token_id, False), TrainSettings(lr=1e-2))
    assert stats.steps == 1 and not torch.equal(before, model.memory.input_rows.detach())


def test_coupled_shares_one_tensor_decoupled_has_two(tiny_model_dir):
    coupled = build(tiny_model_dir)
    assert coupled.memory.output_rows is coupled.memory.input_rows
    assert len(coupled.row_parameters()) == 1
    decoupled = build(tiny_model_dir, decouple_embeddings=True)
    assert decoupled.memory.output_rows is not decoupled.memory.input_rows
    assert len(decoupled.row_parameters()) == 2
    assert decoupled.parameter_breakdown()["tool_memory"] == 2 * coupled.parameter_breakdown()["tool_memory"]


@pytest.mark.parametrize("use_lora", [False, True])
def test_save_then_load_reproduces_logits_and_holds_no_backbone(tiny_model_dir, tmp_path, use_lora):
    lora = LoraSettings(r=4, layer_indices=[-1]) if use_lora else None
    model = build(tiny_model_dir, lora_config=lora, decouple_embeddings=True)
    batch = train_batch(model)
    data = NativeFunctionCallingDataset(SAMPLES, model.tokenizer, model.encode_tool, mode="train")
    train_round(model, make_dataloader(data, 3, model.tokenizer.pad_token_id, False),
                TrainSettings(epochs=2, lr=1e-2, lora_lr=1e-2), train_lora=use_lora)
    model.save(tmp_path / "ckpt")
    fresh = build(tiny_model_dir, lora_config=lora, decouple_embeddings=True)
    fresh.load(tmp_path / "ckpt")
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"]).logits
        got = fresh(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(expected, got)
    rows = load_file(str(tmp_path / "ckpt" / "tool_memory.safetensors"))
    assert set(rows) == {"input_rows", "output_rows"}
    meta = json.loads((tmp_path / "ckpt" / "tool_memory.json").read_text())
    assert meta["tool_names"] == TOOL_NAMES
    files = sorted(p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    if use_lora:
        adapter = load_file(str(tmp_path / "ckpt" / "lora" / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)
        assert all(".layers.1." in k for k in adapter), "layer_indices=[-1] restricts LoRA to the last layer"
    total = sum((tmp_path / "ckpt" / f).stat().st_size for f in files)
    backbone = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" not in n and "tool" not in n)
    assert total < backbone / 10


def _forcing_steps(model, style: str, steps: list[tuple[str, int]]) -> list[int]:
    """Feed a ToolForcingProcessor one row of steps (the model's own argmax choice, then the id actually emitted);
    returns the ids the processor picks."""
    tracker = model.call_boundary_tracker(1)
    gold = [model.get_tool_token_id("book_table"), model.get_tool_token_id("calculate_bmi")]
    processor = ToolForcingProcessor([gold], model.tool_token_ids, model.end_id, tracker, style)
    vocab = model.causal_lm.get_input_embeddings().weight.shape[0]
    picked = []
    for wanted, emitted in steps:
        scores = torch.zeros(1, vocab)
        scores[0, int(wanted)] = 1.0
        picked.append(int(processor(scores).argmax(dim=-1)))
        tracker.update([picked[-1] if emitted is None else emitted])
    return picked


def test_ground_truth_forcing_takes_tool_positions_but_never_inside_a_call(tiny_model_dir):
    model = build(tiny_model_dir)
    tok = model.tokenizer
    book, bmi = model.get_tool_token_id("book_table"), model.get_tool_token_id("calculate_bmi")
    weather = model.get_tool_token_id("get_weather")
    brace_open, brace_close = (tok.convert_tokens_to_ids(t) for t in ("{", "}"))
    end = model.end_id
    # forced: the first step is a tool position whatever the model wants; inside the open object neither an
    # end-of-turn nor a tool choice is replaced; after the object closed, end-of-turn becomes the next gold tool.
    # (The tool the model wants inside the call is left to the call-boundary processor, so `}` is emitted there.)
    picked = _forcing_steps(model, "forced", [(brace_open, None), (brace_open, None), (end, None),
                                              (weather, brace_close), (end, None), (brace_open, None)])
    assert picked == [book, brace_open, end, weather, bmi, brace_open]
    # replace (the original's rule): only a tool the model emits is replaced, the first step is not forced, and a
    # tool the model emits inside an open call is left alone.
    picked = _forcing_steps(model, "replace", [(weather, None), (brace_open, None), (weather, brace_close),
                                               (end, None)])
    assert picked == [book, brace_open, weather, end]
    picked = _forcing_steps(model, "replace", [(brace_open, None), (brace_close, None), (weather, None),
                                               (brace_open, None), (brace_close, None), (weather, None), (weather, None)])
    assert picked == [brace_open, brace_close, book, brace_open, brace_close, bmi, weather]


def test_ground_truth_tool_generation_emits_the_gold_tools_in_order(tiny_model_dir):
    model = build(tiny_model_dir)
    with torch.no_grad():
        model.memory.input_rows.mul_(50.0)  # the model wants a tool token at nearly every step
    batch = eval_batch(model)
    out = model.generate_with_ground_truth_tools(batch["input_ids"], batch["attention_mask"], batch["gold_tools"], 40)
    # A random model never closes a JSON object, so only the first gold tool has a call boundary to take, and with
    # the default call-boundary rule no other tool comes inside that unfinished call.
    assert [o.predicted_tools for o in out] == [s["tools"][:1] for s in SAMPLES]


class ScriptedLM:
    """Stands in for FunctionCallingModel.forward during generation: at answer step t the scores of row b peak at
    scripts[b][t] (10) and next at a space (5). The model writes its script exactly, except where a decoding rule
    forbids a token; there it writes a space, which keeps JSON valid."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, space_id: int):
        self.scripts, self.vocab_size, self.space_id, self.step = scripts, vocab_size, space_id, 0

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> CallingOutput:
        logits = torch.zeros(len(self.scripts), 1, self.vocab_size)
        logits[:, 0, self.space_id] = 5.0
        for row, script in enumerate(self.scripts):
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return CallingOutput(logits=logits)


def token_ids(model, *parts: str) -> list[int]:
    """Ids of a scripted answer: a tool name is its token, "<eot>" the end of turn, anything else text."""
    ids: list[int] = []
    for part in parts:
        if part in TOOL_NAMES:
            ids.append(model.get_tool_token_id(part))
        elif part == "<eot>":
            ids.append(model.end_id)
        else:
            ids.extend(model.tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def scripted(model, monkeypatch, *scripts: list[int]) -> None:
    space = model.tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert len(space) == 1
    monkeypatch.setattr(model, "forward", ScriptedLM(list(scripts), model.token_to_slot.shape[0], space[0]))


def tool_tokens_only_between_calls(model, row: list[int]) -> bool:
    """Between two tool tokens there is exactly one whole JSON object (decoded text, parsed with json)."""
    tools = set(model.tool_token_ids.tolist())
    positions = [i for i, token in enumerate(row) if token in tools]
    for before, after in zip(positions, positions[1:]):
        try:
            call = json.loads(model.tokenizer.decode(row[before + 1:after]))
        except json.JSONDecodeError:
            return False
        if not isinstance(call, dict):
            return False
    return True


A, B, C = '{"a": 1}', '{"b": 2}', '{"c": 3}'


def test_gold_tools_are_forced_at_call_boundaries_with_the_rule_on(tiny_model_dir, monkeypatch):
    model = build(tiny_model_dir)
    assert model.constrain_calls, "the call-boundary rule is on by default"
    gold = [["get_weather", "convert_currency"], ["get_weather", "convert_currency"], ["search_flights"]]
    scripted(model, monkeypatch,
             token_ids(model, "translate_text", A, "book_table", B, "<eot>"),  # wrong tools at both boundaries
             token_ids(model, " ", A, "<eot>", B, "<eot>"),  # text first, then wants to stop after one call
             token_ids(model, "translate_text", C, "book_table", B, "<eot>"))  # wants a second tool, gold has one
    batch = eval_batch(model)
    out = model.generate_with_ground_truth_tools(batch["input_ids"], batch["attention_mask"], gold, 30)
    assert [o.token_ids for o in out] == [
        token_ids(model, "get_weather", A, "convert_currency", B, "<eot>"),
        token_ids(model, "get_weather", A, "convert_currency", B, "<eot>"),
        token_ids(model, "search_flights", C, "<eot>"),
    ]
    assert [o.predicted_tools for o in out] == gold
    assert [o.function_calls for o in out] == [[A, B], [A, B], [C]]


@pytest.mark.parametrize("style", ["forced", "replace"])
def test_gold_tools_are_never_forced_inside_an_unfinished_call(tiny_model_dir, monkeypatch, style):
    model = build(tiny_model_dir)
    gold = [["get_weather", "convert_currency"]]
    # The model opens a call with a (wrong) tool, then wants to end the turn inside the unfinished object.
    scripted(model, monkeypatch, token_ids(model, "translate_text", '{"a": ', "<eot>", "1}", "<eot>"))
    batch = eval_batch(model, SAMPLES[:1])
    (out,) = model.generate_with_ground_truth_tools(batch["input_ids"], batch["attention_mask"], gold, 30, style)
    assert out.token_ids[0] == model.get_tool_token_id("get_weather")
    assert out.predicted_tools == gold[0][: len(out.predicted_tools)]
    assert tool_tokens_only_between_calls(model, out.token_ids), model.tokenizer.decode(out.token_ids)


def test_a_tool_token_never_comes_inside_a_call(tiny_model_dir, monkeypatch):
    model = build(tiny_model_dir)
    script = token_ids(model, "translate_text", '{"a": ', "book_table", "1}", "calculate_bmi", B, "<eot>")
    batch = eval_batch(model, SAMPLES[:1])
    scripted(model, monkeypatch, script)
    (constrained,) = model.generate_ids(batch["input_ids"], batch["attention_mask"], 30)
    assert constrained == token_ids(model, "translate_text", '{"a": ', " ", "1}", "calculate_bmi", B, "<eot>")
    assert tool_tokens_only_between_calls(model, constrained)
    model.constrain_calls = False
    scripted(model, monkeypatch, script)
    (free,) = model.generate_ids(batch["input_ids"], batch["attention_mask"], 30)
    assert free == script and not tool_tokens_only_between_calls(model, free), "the script itself breaks the rule"


def test_call_boundary_tracker_follows_json_outside_strings(tiny_model_dir):
    model = build(tiny_model_dir)
    tok = model.tokenizer
    tool = model.get_tool_token_id("get_weather")
    tracker = model.call_boundary_tracker(1)
    text_ids = tok('{"q": "a } and { \\" quote", "n": {"m": 1}}', add_special_tokens=False)["input_ids"]
    allowed = [tracker.allowed()[0]]
    for token in [tool] + text_ids:
        tracker.update([token])
        allowed.append(tracker.allowed()[0])
    assert allowed[0] and not allowed[1], "a tool may start the answer; right after one the JSON must follow"
    assert allowed[-1], "after the closing brace the next call may start"
    assert not any(allowed[1:-1]), "braces and escaped quotes inside strings do not close the object"
    tracker.update([tool])
    assert tracker.allowed() == [False]


def test_constrained_generation_puts_tools_only_at_call_boundaries(tiny_model_dir):
    model = build(tiny_model_dir)
    with torch.no_grad():
        model.memory.input_rows.mul_(50.0)  # a random model that wants a tool token at nearly every step
    batch = eval_batch(model)
    model.constrain_calls = False
    free = model.generate_ids(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    assert all(sum(model.get_tool_name_from_token_id(t) is not None for t in row) > 1 for row in free)
    model.constrain_calls = True
    constrained = model.generate_ids(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    for row in constrained:
        tools = [i for i, t in enumerate(row) if model.get_tool_name_from_token_id(t) is not None]
        assert tools == [0], "no JSON object ever closes, so only the first token may be a tool"


def test_generation_offers_only_the_given_tools(tiny_model_dir, tmp_path):
    model = build(tiny_model_dir)
    model.constrain_calls = False
    with torch.no_grad():
        model.memory.input_rows.mul_(50.0)
    batch = eval_batch(model)
    offered = ["book_table", "calculate_bmi"]
    model.set_generation_tools(offered)
    rows = model.generate_ids(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    names = {model.get_tool_name_from_token_id(t) for row in rows for t in row} - {None}
    assert names and names <= set(offered)
    model.save(tmp_path / "ckpt")
    fresh = build(tiny_model_dir)
    fresh.load(tmp_path / "ckpt")
    assert fresh.generation_tools == offered
    with pytest.raises(UserError, match="unknown tool"):
        model.set_generation_tools(["no_such_tool"])


def test_batched_generation_equals_one_by_one(tiny_model_dir):
    model = build(tiny_model_dir)
    batch = eval_batch(model)
    together = model.generate_ids(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    for i in range(len(SAMPLES)):
        single = eval_batch(model, [SAMPLES[i]])
        alone = model.generate_ids(single["input_ids"], single["attention_mask"], max_new_tokens=12)
        assert alone[0] == together[i]
    assert len({eval_batch(model, [s])["input_ids"].shape[1] for s in SAMPLES}) > 1, "rows must differ in length"


def test_parse_generated_splits_at_tool_tokens(tiny_model_dir):
    model = build(tiny_model_dir)
    tok = model.tokenizer
    ids = ([model.get_tool_token_id("get_weather")] + tok('{"city": "Paris"}', add_special_tokens=False)["input_ids"]
           + [model.get_tool_token_id("book_table")] + tok('{"n": 2}', add_special_tokens=False)["input_ids"]
           + [model.end_id] + [model.get_tool_token_id("calculate_bmi")])
    parsed = model.parse_generated(ids)
    assert parsed.predicted_tools == ["get_weather", "book_table"]
    assert parsed.function_calls == ['{"city": "Paris"}', '{"n": 2}']


def test_an_answer_without_tool_token_keeps_its_text_for_the_paper_scores(tiny_model_dir):
    model = build(tiny_model_dir)
    tok = model.tokenizer
    ids = tok(' {"city": "Paris"} ', add_special_tokens=False)["input_ids"] + [model.end_id] + [5]
    parsed = model.parse_generated(ids)
    assert parsed.predicted_tools == [] and parsed.function_calls == []
    assert parsed.untooled_text == '{"city": "Paris"}'
    with_tool = model.parse_generated([model.get_tool_token_id("get_weather")] + ids)
    assert with_tool.untooled_text is None


def test_stop_tokens_of_the_generation_config_end_the_answer_as_generate_does(tiny_model_dir):
    model = build(tiny_model_dir)
    end_of_text = model.tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    model.causal_lm.generation_config.eos_token_id = [end_of_text, model.end_id]
    tool, call = model.get_tool_token_id("get_weather"), model.tokenizer('{"a": 1}', add_special_tokens=False)
    ids = [tool, *call["input_ids"], end_of_text, tool, *call["input_ids"], model.end_id]
    assert model.stop_ids == [model.end_id]
    assert model.parse_generated(ids).predicted_tools == ["get_weather", "get_weather"]  # end-of-text is not an end
    model.set_stop_tokens("generation_config")
    assert model.stop_ids == [model.end_id, end_of_text]
    parsed = model.parse_generated(ids)
    assert parsed.predicted_tools == ["get_weather"] and parsed.function_calls == ['{"a": 1}']
    with pytest.raises(UserError, match="--stop_tokens: expected one of eot, generation_config"):
        model.set_stop_tokens("eos")


def test_tokenizer_without_reserved_tokens_gets_added_tokens(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["use the tool with city Paris"] * 10,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    base_vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=base_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = FunctionCallingModel(str(tmp_path), 3, ["a", "b", "c"], device="cpu")
    assert [model.get_tool_token_id(t) for t in "abc"] == [base_vocab, base_vocab + 1, base_vocab + 2]
    assert model.causal_lm.get_input_embeddings().weight.shape[0] == base_vocab + 3
    batch = train_batch(model, [make_sample(["b"], [{"city": "Paris"}])])
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.memory.input_rows.grad[1].abs().sum() > 0


def test_the_tool_past_the_reserved_slots_gets_an_added_token(tiny_model_dir):
    names = [f"tool_{i}" for i in range(249)]
    model = FunctionCallingModel(str(tiny_model_dir), len(names), names, device="cpu")
    reserved = reserved_token_ids(model.tokenizer)
    assert len(reserved) == 248 and model.tool_token_ids[:248].tolist() == reserved
    assert model.tokenizer.convert_ids_to_tokens(model.get_tool_token_id("tool_248")) == "<|tool_memory_0|>"
    assert model.causal_lm.get_input_embeddings().weight.shape[0] == len(model.tokenizer)


def test_missing_model_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load"):
        FunctionCallingModel(str(tmp_path / "nope"), 1, ["a"], device="cpu")


def test_loading_on_cuda_takes_cudnn_attention_out_of_sdpa(tiny_model_dir, monkeypatch):
    import model as model_module

    switched = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", switched.append)
    model_module.avoid_cudnn_attention(torch.device("cpu"))
    assert switched == []
    model_module.avoid_cudnn_attention(torch.device("cuda", 0))
    assert switched == [False]
    seen = []
    monkeypatch.setattr(model_module, "avoid_cudnn_attention", seen.append)
    model_module.load_base_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    assert seen == [torch.device("cpu")], "every backbone load passes its device"


def test_training_pass_auto_is_one_pass_on_cuda_and_split_elsewhere():
    from model import resolve_training_pass

    assert resolve_training_pass("auto", torch.device("cuda", 0)) == "one"
    assert resolve_training_pass("auto", torch.device("cpu")) == "split"
    assert resolve_training_pass("split", torch.device("cuda", 0)) == "split"
    with pytest.raises(UserError, match="--training_pass: expected one of auto, split, one"):
        resolve_training_pass("two", torch.device("cpu"))


def test_one_pass_and_split_give_the_same_loss_and_row_gradients(tiny_model_dir):
    model = build(tiny_model_dir)
    batch = train_batch(model)
    results = []
    for training_pass in ("split", "one"):
        model.training_pass = training_pass
        model.zero_grad(set_to_none=True)
        assert (model.constant_prefix_length(batch["input_ids"]) > 0) == (training_pass == "split")
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        out.loss.backward()
        results.append((out.loss.detach(), model.memory.input_rows.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
