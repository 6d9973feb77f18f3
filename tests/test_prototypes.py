"""Query prototypes of the tool memory: what a round records, the loss they add in later rounds, what it protects,
and how a checkpoint keeps them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TOOL_NAMES, make_sample
from dataset import NativeFunctionCallingDataset, make_dataloader
from model import FunctionCallingModel
from tool_memory import PROTOTYPE_KEYS
from training import TrainSettings, record_prototypes, train_round

ROUND_ONE = [
    make_sample(["get_weather"], [{"city": "Paris"}], "What is the weather in Paris?"),
    make_sample(["get_weather"], [{"city": "Rome"}], "Weather for Rome today, please."),
    make_sample(["convert_currency", "get_weather"], [{"amount": 3}, {"city": "Oslo"}], "Convert 3 USD, then Oslo weather."),
]
ROUND_TWO = [make_sample(["search_flights"], [{"to": city}], f"Find flights to {city}.") for city in ("Lima", "Kyiv", "Baku")]


def build(model_dir) -> FunctionCallingModel:
    model = FunctionCallingModel(str(model_dir), len(TOOL_NAMES), TOOL_NAMES, device="cpu")
    model.initialize_rows(seed=1)
    return model


def loader_of(model, samples, batch_size: int = 2):
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, mode="train")
    return make_dataloader(data, batch_size, model.tokenizer.pad_token_id, shuffle=False)


def mask(*names: str) -> torch.Tensor:
    return torch.tensor([name in names for name in TOOL_NAMES])


def states_before_tool_tokens(model, samples) -> dict[str, list[torch.Tensor]]:
    """Each sample alone, unpadded: the last hidden state at every position whose next token is a tool's."""
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, mode="train")
    states: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(len(data)):
            ids = torch.tensor([data[i]["input_ids"]])
            hidden = model.causal_lm.get_decoder()(inputs_embeds=model.embed(ids)).last_hidden_state[0]
            for position, token in enumerate(ids[0, 1:].tolist()):
                name = model.get_tool_name_from_token_id(token)
                if name is not None:
                    states.setdefault(name, []).append(hidden[position])
    return states


def test_a_round_records_the_mean_and_deviation_of_the_states_that_predict_each_of_its_tools(tiny_model_dir):
    model = build(tiny_model_dir)
    count = record_prototypes(model, loader_of(model, ROUND_ONE), mask("get_weather"))
    memory = model.memory
    assert count == 3 and memory.has_prototype().tolist() == [True] + [False] * 5  # convert_currency not asked
    expected = torch.stack(states_before_tool_tokens(model, ROUND_ONE)["get_weather"])
    assert memory.prototype_count[0] == 3
    assert torch.allclose(memory.prototype_mean[0], expected.mean(0), atol=1e-5)
    assert torch.allclose(memory.prototype_std[0], expected.std(0, correction=0), atol=1e-4)
    assert memory.prototype_std[0].min() > 0  # three different queries
    assert not memory.prototype_mean[1:].any() and not memory.prototype_std[1:].any()


def test_the_loss_is_the_cross_entropy_of_the_draws_over_the_learned_tools_only(tiny_model_dir):
    memory = build(tiny_model_dir).memory
    hidden = memory.prototype_mean.shape[-1]
    generator = torch.Generator().manual_seed(0)
    learned = mask("get_weather", "convert_currency", "search_flights")
    assert memory.prototype_loss(mask("get_weather"), learned, 8, generator) is None, "no prototype recorded yet"
    mean = torch.randn(len(TOOL_NAMES), hidden, dtype=torch.float64)  # sums in float64, as record_prototypes keeps
    memory.set_prototypes(mean * 4, mean.square() * 4, torch.full((len(TOOL_NAMES),), 4), mask("get_weather"))
    assert torch.equal(memory.prototype_std[0], torch.zeros(hidden)), "four identical states: no spread"
    loss = memory.prototype_loss(mask("get_weather"), learned, 8, generator)
    logits = mean[0].float() @ memory.output_rows.detach()[:3].t()
    assert loss.item() == pytest.approx(F.cross_entropy(logits.unsqueeze(0), torch.tensor([0])).item(), rel=1e-5)
    loss.backward()
    grad = memory.input_rows.grad
    assert grad[:3].abs().sum(-1).gt(0).all() and not grad[3:].any(), "tools not learned yet take no part"


def test_a_new_row_that_copies_an_old_one_stops_taking_its_queries_with_the_prototype_loss(tiny_model_dir):
    margins = {}
    for weight in (0.0, 1.0):
        model = build(tiny_model_dir)
        record_prototypes(model, loader_of(model, ROUND_ONE), mask("get_weather", "convert_currency"))
        with torch.no_grad():  # the new tool starts as get_weather's twin: it ties on every get_weather query
            model.memory.input_rows[2] = model.memory.input_rows[0]
        old = model.memory.input_rows.detach()[mask("get_weather", "convert_currency")].clone()
        torch.manual_seed(3)
        settings = TrainSettings(epochs=4, lr=2e-2, renorm_active_tools=True, prototype_weight=weight)
        stats = train_round(model, loader_of(model, ROUND_TWO), settings, mask("search_flights"))
        rows = model.memory.input_rows.detach()
        assert torch.equal(rows[mask("get_weather", "convert_currency")], old), "earlier rows stay bit for bit"
        with torch.no_grad():
            logits = model.memory.tool_logits(model.memory.prototype_mean[0])
        margins[weight] = float(logits[0] - logits[2])
        assert math.isnan(stats.mean_prototype_loss) == (weight == 0)
    assert margins[1.0] > 0 and margins[1.0] > margins[0.0] + 0.5, margins


def test_a_checkpoint_keeps_the_prototypes_and_an_older_one_loads_without_them(tiny_model_dir, tmp_path):
    model = build(tiny_model_dir)
    model.save(tmp_path / "none")
    assert set(load_file(str(tmp_path / "none" / "tool_memory.safetensors"))) == {"input_rows"}
    record_prototypes(model, loader_of(model, ROUND_ONE), mask("get_weather", "convert_currency"))
    model.save(tmp_path / "with")
    saved = load_file(str(tmp_path / "with" / "tool_memory.safetensors"))
    assert set(saved) == {"input_rows", *PROTOTYPE_KEYS}
    other = build(tiny_model_dir)
    other.load(tmp_path / "with")
    for key in PROTOTYPE_KEYS:
        assert torch.equal(getattr(other.memory, key), getattr(model.memory, key))
    other.load(tmp_path / "none")
    assert not other.memory.has_prototype().any()
