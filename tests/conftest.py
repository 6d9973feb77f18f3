"""Shared fixtures: a tiny tokenizer with the Llama-3 special tokens and a tiny random Llama, built in seconds."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Formats that can hold a pickle; a run directory must never contain one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")

TOOL_NAMES = ["get_weather", "convert_currency", "search_flights", "calculate_bmi", "book_table", "translate_text"]

TRAINING_TEXTS = [
    "What is the weather in Paris on 2024-05-01?",
    "Convert 100 USD to EUR please.",
    "Find flights from Berlin to Rome on 2024-06-10.",
    "Compute the BMI for 70 kg and 1.75 m.",
    "Book a table for 4 at Luigi at 19:00.",
    "Translate 'good morning' into Spanish.",
    '{"city": "Paris", "date": "2024-05-01"}',
    '{"amount": 100, "from_currency": "USD", "to_currency": "EUR"}',
    '{"origin": "Berlin", "destination": "Rome", "date": "2024-06-10"}',
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_backbone import build_tokenizer

    return build_tokenizer(TRAINING_TEXTS, vocab_size=900)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random tiny Llama (2 layers, hidden 64) with the tiny tokenizer: a valid --model_name."""
    import torch
    from tiny_backbone import build_random_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    model = build_random_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen_style_backbone(path: Path, tied: bool = True) -> Path:
    """A random tiny Qwen2 (2 layers, hidden 32, 1024 positions) and a byte-level BPE tokenizer with a ChatML template
    and no reserved special tokens, so tool tokens must be added and the vocabulary resized (small Qwen / GPT-2
    style; `tied`: one matrix for input embeddings and lm head)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TRAINING_TEXTS, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory) -> Path:
    """A tied-embedding Qwen2-style backbone whose tokenizer has no reserved special tokens."""
    return build_qwen_style_backbone(tmp_path_factory.mktemp("tied_qwen"), tied=True)


def make_sample(tools: list[str], values: list[dict], query: str | None = None) -> dict:
    """A sample in the per-round file format."""
    return {
        "user_input": query or " Also, ".join(f"use {t} with {json.dumps(v)}" for t, v in zip(tools, values)),
        "tools": tools,
        "function_calls": [json.dumps(v) for v in values],
    }


def write_round_files(data_dir: Path, start: int, end: int, tools: list[str], train_calls: int = 4,
                      test_calls: int = 4, n_train: int = 12, n_test: int = 4) -> None:
    """Tiny per-round files with the docs/DESIGN.md names, for CLI tests."""
    train, test = [], []
    for i in range(n_train):
        tool = tools[i % len(tools)]
        train.append(make_sample([tool], [{"city": f"city{i}", "days": i % 5 + 1}], f"{tool} for city{i} in {i % 5 + 1} days"))
    for i in range(n_test):
        pair = [tools[i % len(tools)], tools[(i + 1) % len(tools)]]
        test.append(make_sample(pair, [{"city": f"town{i}"}, {"days": i + 1}]))
    (data_dir / "training").mkdir(parents=True, exist_ok=True)
    (data_dir / "test").mkdir(parents=True, exist_ok=True)
    (data_dir / "training" / f"function_calling_train_tools{start}-{end}_{train_calls}calls.json").write_text(json.dumps(train))
    (data_dir / "test" / f"function_calling_test_tools{start}-{end}_{test_calls}calls.json").write_text(json.dumps(test))
    descriptions = {t: {"name": t, "description": f"the {t} tool", "parameters": {}} for t in tools}
    (data_dir / f"tool_descriptions_tools{start}-{end}.json").write_text(json.dumps(descriptions))


@pytest.fixture(scope="session")
def two_round_data(tmp_path_factory) -> Path:
    """Two rounds of three tools each (1-3, 4-6), 24 training samples per round: the kill/resume runs' data."""
    data = tmp_path_factory.mktemp("two_round_data")
    write_round_files(data, 1, 3, ["get_weather", "convert_currency", "search_flights"], n_train=24)
    write_round_files(data, 4, 6, ["calculate_bmi", "book_table", "translate_text"], n_train=24)
    return data


def digest(value) -> str:
    """SHA-256 of a JSON-serialisable value."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def digest_in_fresh_interpreter(imports: str, expression: str, hash_seed: str = "12345") -> str:
    """`digest(expression)` computed by a new interpreter with its own string-hash seed: a result that depends on
    set or dict-of-set iteration order (or on state left by earlier calls) differs from this process's."""
    import os

    code = f"import hashlib, json; {imports}; print(hashlib.sha256(json.dumps({expression}, sort_keys=True).encode())" \
           ".hexdigest())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def output_dir_of(args: list[str]) -> Path:
    return Path(args[args.index("--output_dir") + 1])


def run_to_end(script: str, args: list[str], cwd: Path) -> dict:
    """Run a sequential CLI to the end; check its run directory (complete files, no pickles) and return summary.json."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = output_dir_of(args)
    assert_files_complete(out)
    assert_no_pickle_files(out)
    return json.loads((out / "summary.json").read_text())


def numbers(summary: dict) -> dict:
    """The parts of summary.json a rerun must reproduce exactly (not the wall time)."""
    return {"matrix": summary["matrix"], "round_stats": summary["round_stats"]}


def kill_in_round_two(script: str, args: list[str], cwd: Path) -> Path:
    """Start a two-round run, SIGKILL it as soon as round 1 is recorded as finished, and check what it left."""
    run_dir = output_dir_of(args)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / script), *args], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "state.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            if state.is_file() and json.loads(state.read_text())["completed_rounds"] == 1:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before round 2 could be interrupted"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads(state.read_text())["completed_rounds"] == 1
    assert not (run_dir / "summary.json").exists()
    assert_files_complete(run_dir)
    return run_dir


def assert_files_complete(run_dir: Path) -> None:
    """Every file under its final name is whole: JSON parses, safetensors open, PNGs end; temporaries are dot files."""
    from safetensors import safe_open

    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), f"unexpected hidden file {path}"
            continue
        assert not path.name.endswith(".tmp"), f"temporary file under a final name: {path}"
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as tensors:
                for key in tensors.keys():
                    tensors.get_tensor(key)
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), f"truncated image {path}"


def assert_forgetting_plot(path: Path) -> None:
    """A whole PNG holding the three heat maps side by side (figure 3 x 4.2 wide, 3.6 high), not one flat colour."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width > 2 * height, (width, height)
    assert colours is None or len(colours) > 3


def assert_no_pickle_files(run_dir: Path) -> None:
    """A run directory holds safetensors and JSON, never a pickle-capable format."""
    found = [str(p) for p in run_dir.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES]
    assert not found, f"pickle-capable files in {run_dir}: {found}"


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """main() replaces the root handlers (and may add a file handler); put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture
def restore_logging():
    with kept_logging():
        yield


# ---------------------------------------------------------------------------------------------------------------------
# In-process runs of the sequential CLIs with every training round recorded


class Interrupted(Exception):
    """Raised by a TrainingRecorder at the round it was told to stop at: the run dies there, as if killed."""


@dataclass
class RoundRecord:
    """One call of training.train_round: which round, the trainable state before and after, the batches it saw."""

    description: str
    active: torch.Tensor | None
    train_lora: bool
    steps: int
    rows_before: list[torch.Tensor]
    rows_after: list[torch.Tensor]
    lora_before: dict[str, torch.Tensor]
    lora_after: dict[str, torch.Tensor]
    batches: list[list[str]] = field(default_factory=list)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


class RecordingLoader:
    """Passes a loader's batches through unchanged (no extra draw from its generator) and keeps their queries."""

    def __init__(self, loader, batches: list[list[str]]):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(list(batch["user_input"]))
            yield batch


class TrainingRecorder:
    """Stands in for sequential.train_round: runs the real one and records each call (see RoundRecord).

    With `stop_at`, the call for that round raises Interrupted before training: the run stops as a killed one would,
    after the previous round was recorded as finished.
    """

    def __init__(self, stop_at: str | None = None):
        import training

        self.real = training.train_round
        self.stop_at = stop_at
        self.records: list[RoundRecord] = []

    @property
    def descriptions(self) -> list[str]:
        return [record.description for record in self.records]

    def __call__(self, model, loader, settings, active, train_lora, description, **kwargs):
        if description == self.stop_at:
            raise Interrupted(description)
        rows_before = [rows.detach().clone() for rows in model.row_parameters()]
        lora_before = lora_state(model)
        batches: list[list[str]] = []
        stats = self.real(model, RecordingLoader(loader, batches), settings, active, train_lora, description,
                          **kwargs)
        self.records.append(RoundRecord(
            description, None if active is None else active.clone(), train_lora, stats.steps, rows_before,
            [rows.detach().clone() for rows in model.row_parameters()], lora_before, lora_state(model), batches))
        return stats


def run_in_process(main: Callable[[list[str]], int], argv: list[str], recorder: TrainingRecorder) -> dict | None:
    """Run a sequential CLI's main() in this process with `recorder` as its train_round; summary.json when it ends."""
    with pytest.MonkeyPatch.context() as patch, kept_logging():
        patch.setattr("sequential.train_round", recorder)
        try:
            assert main(argv) == 0
        except Interrupted:
            return None
    out = output_dir_of(argv)
    assert_files_complete(out)
    return json.loads((out / "summary.json").read_text())
