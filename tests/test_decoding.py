"""decoding.greedy_decode, the one decoder: its ids equal an independent reference for each of its users.

TokMem is compared with a naive decoder (one prompt at a time, the whole sequence re-run at every step, no cache);
plain causal LMs (the ICL/RAG baseline, the tiny backbone's report) and the LoRA baseline with transformers' greedy
`generate`, called as those users called it before they moved onto greedy_decode.
"""

from __future__ import annotations

import torch

from conftest import TOOL_NAMES, make_sample
from dataset import NativeFunctionCallingDataset, build_prompt_ids, left_pad_collate
from decoding import causal_lm_step, decode_prompts, greedy_decode
from lora_sequential import MarkerLoRAModel
from model import FunctionCallingModel, LoraSettings, load_base_model, load_tokenizer

SAMPLES = [
    make_sample(["get_weather"], [{"city": "Paris"}]),
    make_sample(["convert_currency", "get_weather"], [{"amount": 3}, {"city": "Rome"}]),
    make_sample(["search_flights", "book_table", "get_weather"], [{"a": 1}, {"b": 2}, {"c": "x"}]),
    make_sample(["book_table"], [{"b": 2}], query="A table for two, please, tonight at eight."),
]


def eval_batch(model, samples=SAMPLES):
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, mode="eval")
    return left_pad_collate([data[i] for i in range(len(data))], model.tokenizer.pad_token_id)


@torch.no_grad()
def naive_tokmem(model: FunctionCallingModel, prompt: list[int], gold: list[str] | None, steps: int) -> list[int]:
    """One prompt, no cache, no padding: the definition of TokMem's greedy decoding under its processors."""
    processors = model.decoding_processors(1, None if gold is None else [gold])
    ids = torch.tensor([prompt])
    new: list[int] = []
    for _ in range(steps):
        scores = model(ids).logits[:, -1, :]
        for processor in processors:
            scores = processor(scores)
        new.append(int(scores.argmax(dim=-1)))
        for processor in processors:
            processor.observe(new[-1:])
        if new[-1] == model.end_id:
            break
        ids = torch.cat([ids, torch.tensor([new[-1:]])], dim=1)
    return new


def test_tokmem_decoding_equals_the_uncached_one_by_one_decoder(tiny_model_dir):
    model = FunctionCallingModel(str(tiny_model_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu")
    model.initialize_rows(seed=1)
    with torch.no_grad():
        model.memory.input_rows.mul_(30.0)  # tool tokens compete at many steps, so the processors have work to do
    model.set_generation_tools(TOOL_NAMES[:4])
    batch = eval_batch(model)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert len({len(p) for p in prompts}) > 1, "the batch must be left-padded"
    free = model.generate_with_tool_prediction(batch["input_ids"], batch["attention_mask"], max_new_tokens=16)
    assert [out.token_ids for out in free] == [naive_tokmem(model, p, None, 16) for p in prompts]
    assert any(out.predicted_tools for out in free)
    for style in ("forced", "replace"):
        forced = model.generate_with_ground_truth_tools(batch["input_ids"], batch["attention_mask"],
                                                        batch["gold_tools"], max_new_tokens=16, style=style)
        assert [out.token_ids for out in forced] == [
            naive_tokmem(model, p, g, 16) for p, g in zip(prompts, batch["gold_tools"])]


def hf_greedy(model, prompts: list[list[int]], pad_id: int, stops: list[int], steps: int) -> list[list[int]]:
    """transformers' greedy generate on one left-padded batch, cut after the first stop id."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=pad_id)
    rows = out[:, width:].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def test_plain_causal_lm_decoding_equals_transformers_generate(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    prompts = [build_prompt_ids(tokenizer, s["user_input"]) for s in SAMPLES]
    pad = tokenizer.pad_token_id
    free = decode_prompts(causal_lm_step(model), prompts, pad, batch_size=2, max_new_tokens=12, stop_ids=[pad])
    # A stop id the random model reaches mid-answer in some rows, so cutting and finished rows are exercised.
    stop = free[0][5]
    stops = [pad, stop]
    ours = decode_prompts(causal_lm_step(model), prompts, pad, batch_size=3, max_new_tokens=12, stop_ids=stops)
    assert any(len(row) < 12 for row in ours) and any(row[-1] == stop for row in ours)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    expected: dict[int, list[int]] = {}
    for chunk in (order[:3], order[3:]):
        for index, row in zip(chunk, hf_greedy(model, [prompts[i] for i in chunk], pad, stops, 12)):
            expected[index] = row
    assert ours == [expected[i] for i in range(len(prompts))]


def test_lora_baseline_decoding_equals_transformers_generate(tiny_model_dir):
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    model = MarkerLoRAModel(str(tiny_model_dir), TOOL_NAMES, device="cpu", lora_config=settings)
    with torch.no_grad():
        for name, param in model.base_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = eval_batch(model)
    ours = model.generate_ids(batch["input_ids"], batch["attention_mask"], 12)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    expected = hf_greedy(model.base_model, prompts, model.tokenizer.pad_token_id, [model.end_id], 12)
    assert ours == expected
    plain = MarkerLoRAModel(str(tiny_model_dir), TOOL_NAMES, device="cpu", lora_config=settings)
    assert plain.generate_ids(batch["input_ids"], batch["attention_mask"], 12) != ours, "the adapter is used"


def test_greedy_decode_stops_rows_independently_and_fills_finished_rows():
    vocab, stop = 6, 5

    def step(input_ids, attention_mask, position_ids, cache):
        seen = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        scores = torch.zeros(seen.shape[0], vocab)
        # Row r's next token is (its length + 2r) mod vocab: row 1 reaches the stop id first.
        lengths = attention_mask.sum(-1)
        scores[torch.arange(seen.shape[0]), (lengths + 2 * torch.arange(seen.shape[0])) % vocab] = 1.0
        return scores, seen

    ids = torch.tensor([[0, 1, 2], [0, 0, 1]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    rows = greedy_decode(step, ids, mask, max_new_tokens=10, stop_ids=[stop])
    assert rows == [[3, 4, 5], [4, 5]]
    assert greedy_decode(step, ids, mask, max_new_tokens=2, stop_ids=[stop]) == [[3, 4], [4, 5]]
    assert greedy_decode(step, ids, mask, max_new_tokens=0, stop_ids=[stop]) == [[], []]
