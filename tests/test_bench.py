"""Smoke test of bench/bench_tool_memory.py at toy sizes: the compared paths compute the same thing (never timing)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from model import reserved_token_ids

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_tool_memory.py"
_SPEC = importlib.util.spec_from_file_location("bench_tool_memory", _PATH)
bench = sys.modules.setdefault("bench_tool_memory", importlib.util.module_from_spec(_SPEC))
if not hasattr(bench, "main"):
    _SPEC.loader.exec_module(bench)

TOY = bench.ShapeSpec(
    name="toy",
    tokenizer="bpe",
    vocab_size=1024,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_tools=12,
    batch_size=3,
    seq_len=40,
    eval_examples=3,
    prompt_len=12,
    new_tokens=6,
)
TOY_IDS = dataclasses.replace(TOY, name="toy-ids", tokenizer="ids")
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=[(TOY, False), (TOY, True), (TOY_IDS, False)], ids=["bpe", "bpe-decoupled", "ids"])
def toy_model(request):
    shape, decoupled = request.param
    return shape, bench.load_shape_model(shape, CPU, torch.float32, seed=0, decouple_embeddings=decoupled)


def test_llama3_id_tokenizer_has_llama3_layout():
    tokenizer = bench.llama3_id_tokenizer()
    assert len(tokenizer) == 128256
    assert reserved_token_ids(tokenizer)[:4] == [128002, 128003, 128005, 128011]
    assert len(reserved_token_ids(tokenizer)) == 248
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert bench.ordinary_id_limit(tokenizer) == 128000


def test_looped_and_vectorized_rows_give_the_same_logits_losses_and_gradients(toy_model):
    shape, model = toy_model
    batch = bench.make_train_batch(model, shape.batch_size, shape.seq_len, seed=0)
    assert torch.isin(batch["input_ids"], model.tool_token_ids).sum() >= shape.batch_size
    looped = bench.LoopedToolModel.sharing(model)
    results = []
    for variant in (model, looped):
        variant.zero_grad(set_to_none=True)
        out = variant(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        (out.loss + out.tool_loss).backward()
        results.append((out, [p.grad.clone() for p in variant.row_parameters()]))
    (fast, fast_grads), (slow, slow_grads) = results
    # The seed-style loop computes every position's logits; TokMem only the labelled positions'.
    assert slow.logits.shape[:2] == batch["input_ids"].shape
    rows, positions = (batch["labels"][:, 1:] != -100).nonzero(as_tuple=True)
    torch.testing.assert_close(slow.logits[rows, positions], fast.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow.loss, fast.loss)
    torch.testing.assert_close(slow.tool_loss, fast.tool_loss)
    for slow_grad, fast_grad in zip(slow_grads, fast_grads):
        assert fast_grad.abs().sum() > 0
        torch.testing.assert_close(slow_grad, fast_grad, rtol=1e-5, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_plain_losses_equal_the_rows_loss_when_the_rows_are_the_backbone_rows():
    model = bench.load_shape_model(TOY, CPU, torch.float32, seed=0, decouple_embeddings=False)
    with torch.no_grad():
        model.memory.input_rows.copy_(model.causal_lm.get_input_embeddings().weight[model.tool_token_ids])
    batch = bench.make_train_batch(model, TOY.batch_size, TOY.seq_len, seed=1)
    stand_in = torch.nn.Parameter(torch.zeros(3))
    rows = bench.rows_loss(model)(batch)
    torch.testing.assert_close(bench.plain_loss(model, stand_in)(batch), rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bench.limit_loss(model, stand_in)(batch), rows, rtol=1e-5, atol=1e-6)


def test_every_train_variant_steps(toy_model):
    shape, model = toy_model
    batch = bench.make_train_batch(model, shape.batch_size, shape.seq_len, seed=0)
    model.train()
    try:
        for variant in bench.train_variants(model):
            before = [p.detach().clone() for p in variant.optimizer.param_groups[0]["params"]]
            loss = bench.train_step(variant, batch)
            assert math.isfinite(loss.item())
            after = variant.optimizer.param_groups[0]["params"]
            if "rows" in variant.label:
                assert not torch.equal(before[0], after[0].detach())
    finally:
        model.eval()


def test_batched_cached_and_one_by_one_decoding_give_the_same_ids(toy_model):
    shape, model = toy_model
    prompts, gold = bench.make_eval_prompts(model, shape.eval_examples, shape.prompt_len, seed=0)
    assert len({len(p) for p in prompts}) > 1, "prompts of one length would not exercise left padding"
    batched = bench.decode_batched(model, prompts, gold, shape.new_tokens)
    naive = bench.decode_one_by_one(model, prompts, gold, shape.new_tokens)
    assert batched == naive
    assert all(row[0] == model.get_tool_token_id(tools[0]) for row, tools in zip(batched, gold))


def test_cli_at_toy_sizes_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "figures.json"
    argv = [
        "--shapes", "tiny", "--device", "cpu", "--num_tools", "8", "--batch_size", "2", "--seq_len", "16",
        "--eval_examples", "2", "--prompt_len", "8", "--new_tokens", "3", "--repeats", "1", "--warmup", "0",
        "--threads", "1", "--json", str(out),
    ]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    labels = (bench.PLAIN, bench.LIMIT, bench.ROWS, bench.LOOP, bench.BATCHED, bench.ONE_BY_ONE)
    assert labels == ("train: plain backbone", "train: plain, logits at labels", "train: rows (TokMem)",
                      "train: rows, loop over tools", "eval: GT tools, batched + KV cache",
                      "eval: one at a time, no cache")
    for label in labels + tuple(bench.RATIO_NAMES):
        assert label in table
    figures = json.loads(out.read_text())
    (result,) = figures["results"]
    for group in ("train", "eval"):
        rows = result[group]
        first = statistics.median(rows[0]["seconds"])
        for row in rows:
            assert row["median_s"] == pytest.approx(statistics.median(row["seconds"]))
            assert row["ratio"] == pytest.approx(statistics.median(row["seconds"]) / first), row["label"]
    assert len(result["train"]) == 4 and len(result["eval"]) == 2
    assert result["eval_same_ids"] is True
    assert figures["settings"]["device"] == "cpu"
    train = {row["label"]: row for row in result["train"]}
    decode = {row["label"]: row for row in result["eval"]}
    expected = {
        "bank_vs_plain": train[bench.ROWS]["median_s"] / train[bench.PLAIN]["median_s"],
        "bank_vs_limit": train[bench.ROWS]["median_s"] / train[bench.LIMIT]["median_s"],
        "loop_vs_bank": train[bench.LOOP]["median_s"] / train[bench.ROWS]["median_s"],
        "decode_speedup": decode[bench.ONE_BY_ONE]["median_s"] / decode[bench.BATCHED]["median_s"],
        "bank_peak_vs_plain": train[bench.ROWS]["peak_mb"] / train[bench.PLAIN]["peak_mb"],
    }
    assert result["ratios"] == pytest.approx(expected)


def test_scale_curves_smoke_measure_every_point_and_fit_slopes(tmp_path):
    shape = dataclasses.replace(TOY, warmup=0, repeats=1, eval_examples=2, new_tokens=3)
    scale = bench.ScaleSettings(tools=(4, 300), answers=(8, 16), offered=(2, 300), prompt_len=8)
    result = bench.bench_scale(shape, scale, CPU, torch.float32, seed=0, training_pass="auto")
    assert [p["tools"] for p in result["tools"]] == [4, 300]
    assert [p["answer_len"] for p in result["answer_len"]] == [8, 16]
    assert [p["offered"] for p in result["offered"]] == [2, 300]
    assert result["training_pass"] == "split"
    # 300 tools pass the tokenizer's 248 reserved tokens: the vocabulary grew by the 52 added ones.
    assert result["tools"][1]["vocab_size"] == result["tools"][0]["vocab_size"] + 52
    assert set(result["slope"]) == {"tools", "answer_len", "offered"}
    assert all(p["tokmem_s"] > 0 and p["plain_s"] > 0 for p in result["tools"] + result["answer_len"])
    bench.plot_scale(result, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").read_bytes().startswith(b"\x89PNG")
    assert "log-log slope" in bench.format_scale(result)


def test_fitted_slope_is_the_log_log_least_squares_slope():
    assert bench.fitted_slope([10, 100, 1000], [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert bench.fitted_slope([10, 100], [5.0, 5.0]) == pytest.approx(0.0)
    assert bench.fitted_slope([10, 100], [-1.0, 3.0]) is None
