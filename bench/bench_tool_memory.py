"""What the tool memory's rows costs: training steps and ground-truth-tool decoding, on random-weight Llama backbones.

Training step (forward + backward + AdamW step, median over repeats after warm-up), four ways on one backbone:
the plain causal LM's usual step (full logits), the plain LM at its limit (LM head and loss only at labelled
positions), FunctionCallingModel (TokMem) and the seed's per-tool loop. Evaluation: ground-truth-tool decoding of a
batch of prompts, batched with the KV cache (`generate_with_ground_truth_tools`) against one example at a time
re-running the whole sequence at every step. Two shapes: the tiny backbone's, and Llama-3.2-1B's widths with few
layers. Weights are random: the figures are about cost, never quality. Per shape, `ratios` sums it up
(`RATIO_NAMES`).

    python bench/bench_tool_memory.py            # both shapes, a few minutes on 2 CPU cores
    python bench/bench_tool_memory.py --quick    # about 30 s
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import os
import platform
import random
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from common import (  # noqa: E402
    CliParser,
    UserError,
    atomic_write_json,
    atomic_write_with,
    positive_int,
    run_cli,
    set_seed,
    setup_logging,
)
from dataset import IGNORE_INDEX, left_pad_collate  # noqa: E402
from decoding import greedy_decode, left_pad, left_pad_positions  # noqa: E402
from model import (  # noqa: E402
    CallingOutput,
    FunctionCallingModel,
    avoid_cudnn_attention,
    labelled_positions,
    TRAINING_PASSES,
    resolve_device,
    resolve_dtype,
    resolve_training_pass,
)
from tiny_backbone import (  # noqa: E402
    BOS_TOKEN,
    EOT_TOKEN,
    LLAMA3_SPECIAL_TOKENS,
    PAD_TOKEN,
    BuildSettings,
    build_random_model,
    build_tokenizer,
)
from training import TrainSettings, build_optimizer  # noqa: E402

logger = logging.getLogger("bench_tool_memory")

LLAMA3_VOCAB_SIZE = 128256
TOOL_EVERY = 16


@dataclass(frozen=True)
class ShapeSpec:
    """A backbone shape and the workload sizes measured on it.

    `tokenizer` is "bpe" (a tiny byte-level BPE trained on synthetic text, built with `tiny_backbone.build_tokenizer`)
    or "ids" (a placeholder word-level vocabulary whose last 256 ids are the Llama-3 special tokens, as in Llama-3).
    """

    name: str
    tokenizer: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_tools: int
    batch_size: int
    seq_len: int
    eval_examples: int
    prompt_len: int
    new_tokens: int
    warmup: int = 1
    repeats: int = 3
    eval_repeats: int = 1

    def describe(self) -> str:
        return (
            f"{self.num_layers}L h{self.hidden_size} i{self.intermediate_size} "
            f"heads {self.num_heads}/{self.num_kv_heads} vocab {self.vocab_size}"
        )


_TINY = BuildSettings()
SHAPES: dict[str, ShapeSpec] = {
    "tiny": ShapeSpec(
        name="tiny",
        tokenizer="bpe",
        vocab_size=_TINY.vocab_size,
        hidden_size=_TINY.hidden_size,
        intermediate_size=_TINY.intermediate_size,
        num_layers=_TINY.num_layers,
        num_heads=_TINY.num_heads,
        num_kv_heads=_TINY.num_kv_heads,
        num_tools=200,
        batch_size=8,
        seq_len=128,
        eval_examples=16,
        prompt_len=64,
        new_tokens=48,
        warmup=2,
        repeats=5,
        eval_repeats=3,
    ),
    "1b-like": ShapeSpec(
        name="1b-like",
        tokenizer="ids",
        vocab_size=LLAMA3_VOCAB_SIZE,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=2,
        num_heads=32,
        num_kv_heads=8,
        num_tools=200,
        batch_size=1,
        seq_len=128,
        eval_examples=4,
        prompt_len=32,
        new_tokens=16,
        warmup=1,
        repeats=3,
    ),
}

# Sizes on a CUDA device (the defaults above are sized for 2 CPU cores).
CUDA_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"eval_examples": 32, "new_tokens": 64, "warmup": 3, "repeats": 10},
    "1b-like": {
        "batch_size": 8, "eval_examples": 16, "prompt_len": 64, "new_tokens": 48, "warmup": 3, "repeats": 10,
        "eval_repeats": 3,
    },
}

# Sizes of `--quick` (about 30 s on 2 CPU cores, both shapes).
QUICK_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "batch_size": 4, "seq_len": 64, "eval_examples": 8, "prompt_len": 32, "new_tokens": 24, "repeats": 3,
        "eval_repeats": 1,
    },
    "1b-like": {
        "num_layers": 1, "batch_size": 1, "seq_len": 64, "eval_examples": 2, "prompt_len": 16, "new_tokens": 8,
        "warmup": 1, "repeats": 1,
    },
}


@dataclass
class Timing:
    """Seconds of each timed repeat and the peak memory over them."""

    seconds: list[float]
    peak_mb: float | None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Backbones


def synthetic_texts(count: int, seed: int) -> list[str]:
    """Pseudo-words and small JSON objects, enough for a BPE vocabulary of a few thousand tokens."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    texts = []
    for _ in range(count):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 20)))
        texts.append(f'{sentence} {{"{rng.choice(words)}": {rng.randint(0, 9999)}}}')
    return texts


def llama3_id_tokenizer(vocab_size: int = LLAMA3_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A text-free tokenizer with Llama-3's id layout: placeholder tokens, then the 256 special tokens on top.

    The benchmark feeds random ids, so only the layout matters: the reserved special tokens (the tool slots) and
    <|eot_id|> sit at Llama-3's ids (128002..., 128009 for a vocabulary of 128256).
    """
    ordinary = vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    if ordinary < 16:
        raise UserError(f"vocab_size {vocab_size} leaves no room below the {len(LLAMA3_SPECIAL_TOKENS)} special tokens")
    vocab = {f"<id{i}>": i for i in range(ordinary)}
    vocab.update({token: ordinary + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<id0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOT_TOKEN, pad_token=PAD_TOKEN
    )


def llama_config(shape: ShapeSpec, tokenizer) -> LlamaConfig:
    """A Llama-3.2 style config (tied embeddings, head_dim = hidden / heads) of `shape`'s widths."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )


def random_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A Llama with uniform random weights of std 0.02 (norms at 1), built on the meta device then filled.

    Filling once is several times faster than the library's initialisation, which matters at a 128k vocabulary.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    bound = 0.02 * 3**0.5
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.uniform_(-bound, bound, generator=generator)
    return model.eval()


def build_backbone(shape: ShapeSpec, directory: Path, dtype: torch.dtype, seed: int):
    """Save a random backbone of `shape` into `directory` (save_pretrained); returns its tokenizer."""
    if shape.tokenizer == "bpe":
        tokenizer = build_tokenizer(synthetic_texts(5000, seed), shape.vocab_size)
        torch.manual_seed(seed)
        backbone = build_random_model(
            tokenizer,
            hidden_size=shape.hidden_size,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size,
        )
    elif shape.tokenizer == "ids":
        tokenizer = llama3_id_tokenizer(shape.vocab_size)
        backbone = random_llama(llama_config(shape, tokenizer), seed)
    else:
        raise ValueError(f"unknown tokenizer kind {shape.tokenizer!r}")
    backbone.to(dtype).save_pretrained(directory)
    del backbone
    gc.collect()
    return tokenizer


def load_shape_model(
    shape: ShapeSpec, device: torch.device, dtype: torch.dtype, seed: int, decouple_embeddings: bool = False,
    training_pass: str = "auto",
) -> FunctionCallingModel:
    """FunctionCallingModel over a freshly saved random backbone of `shape` (the temporary directory is removed)."""
    names = [f"tool_{i:03d}" for i in range(shape.num_tools)]
    with tempfile.TemporaryDirectory(prefix=f"bench_{shape.name}_") as tmp:
        tokenizer = build_backbone(shape, Path(tmp), dtype, seed)
        model = FunctionCallingModel(
            tmp, len(names), names, tokenizer=tokenizer, device=device, dtype=dtype,
            decouple_embeddings=decouple_embeddings,
        )
    model.initialize_rows(seed=seed)
    model.training_pass = resolve_training_pass(training_pass, device)
    return model


def ordinary_id_limit(tokenizer) -> int:
    """Ids below this are ordinary (non-special) tokens: the Llama-3 special tokens take the top of the vocabulary."""
    return min(tokenizer.convert_tokens_to_ids(token) for token in LLAMA3_SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------------------------------
# The naive override


class LoopedToolModel(FunctionCallingModel):
    """The seed's way: a Python loop over the tools builds the input embeddings and writes the tool logits, the LM
    head runs at every position, and the loss comes from the shifted full logits."""

    @classmethod
    def sharing(cls, model: FunctionCallingModel) -> LoopedToolModel:
        """A view of `model` with the looped methods: same backbone, memory and buffers (nothing is copied)."""
        looped = cls.__new__(cls)
        looped.__dict__.update(model.__dict__)
        return looped

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """For each tool: mask its token and write its row there."""
        embeddings = self.causal_lm.get_input_embeddings()(input_ids)
        for index, token_id in enumerate(self.tool_token_ids.tolist()):
            mask = input_ids == token_id
            embeddings[mask] = self.memory.input_rows[index].to(embeddings.dtype)
        return embeddings

    def tool_logits_into(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """For each tool: write `hidden . row` into its logit column."""
        hidden = hidden.float()
        rows = self.memory.output_rows
        for index, token_id in enumerate(self.tool_token_ids.tolist()):
            logits[..., token_id] = hidden @ rows[index].float()
        return logits

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs) -> CallingOutput:
        """With labels: full logits (looped tool columns) and the loss over the shifted logits; else the parent's."""
        if labels is None:
            return super().forward(input_ids, attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = left_pad_positions(attention_mask)
        hidden = self.causal_lm.get_decoder()(
            inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        logits = self.tool_logits_into(hidden, self.causal_lm.get_output_embeddings()(hidden).float())
        shifted = labels[:, 1:].reshape(-1)
        per_token = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, ignore_index=IGNORE_INDEX, reduction="none"
        )
        valid = shifted != IGNORE_INDEX
        is_tool = valid & (self.token_to_slot[shifted.clamp(min=0)] >= 0)
        return CallingOutput(logits=logits, loss=per_token[valid].mean(), tool_loss=per_token[is_tool].mean())


# ---------------------------------------------------------------------------------------------------------------------
# Workloads


def make_train_batch(model: FunctionCallingModel, batch_size: int, seq_len: int, seed: int,
                     answer_len: int | None = None) -> dict[str, torch.Tensor]:
    """Random ordinary ids; the last `answer_len` (default: half) are the answer (labelled): a tool every 16
    positions, end-of-turn last."""
    if seq_len < 8:
        raise UserError(f"--seq_len must be at least 8, got {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, ordinary_id_limit(model.tokenizer), (batch_size, seq_len), generator=generator)
    prompt = seq_len // 2 if answer_len is None else seq_len - answer_len
    positions = torch.arange(prompt, seq_len - 1, TOOL_EVERY)
    slots = torch.randint(0, model.num_tools, (batch_size, len(positions)), generator=generator)
    input_ids[:, positions] = model.tool_token_ids.cpu()[slots]
    input_ids[:, -1] = model.end_id
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, prompt:] = input_ids[:, prompt:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {key: value.to(model.device) for key, value in batch.items()}


def make_eval_prompts(
    model: FunctionCallingModel, count: int, prompt_len: int, seed: int
) -> tuple[list[list[int]], list[list[str]]]:
    """`count` prompts of random ordinary ids (lengths between half and all of `prompt_len`) and 1-3 gold tools each."""
    rng = random.Random(seed)
    limit = ordinary_id_limit(model.tokenizer)
    bos = model.tokenizer.bos_token_id
    prompts, gold = [], []
    for _ in range(count):
        length = rng.randint(max(1, prompt_len // 2), prompt_len)
        prompts.append([bos] + [rng.randrange(limit) for _ in range(length - 1)])
        gold.append(rng.sample(model.tool_names, rng.randint(1, min(3, model.num_tools))))
    return prompts, gold


# ---------------------------------------------------------------------------------------------------------------------
# Training steps


def plain_loss(model: FunctionCallingModel, stand_in: nn.Parameter) -> Callable[[dict], torch.Tensor]:
    """The backbone's usual training loss: its own forward with labels (full logits, the library's loss), its input
    embeddings requiring grad so backward runs through every layer.

    `stand_in` (as many values as the rows) enters the loss with weight zero, so the plain step's AdamW updates as
    many parameters as the rows'.
    """
    lm = model.causal_lm

    def loss(batch: dict) -> torch.Tensor:
        embeddings = lm.get_input_embeddings()(batch["input_ids"]).requires_grad_()
        position_ids = left_pad_positions(batch["attention_mask"])
        out = lm(
            inputs_embeds=embeddings,
            attention_mask=batch["attention_mask"],
            position_ids=position_ids,
            labels=batch["labels"],
        )
        return out.loss + stand_in.sum() * 0.0

    return loss


def limit_loss(model: FunctionCallingModel, stand_in: nn.Parameter) -> Callable[[dict], torch.Tensor]:
    """The plain backbone at its limit: the decoder's forward and backward over every position (input embeddings
    requiring grad, as in `plain_loss`), the LM head and torch's cross-entropy only at the labelled positions."""
    lm = model.causal_lm

    def loss(batch: dict) -> torch.Tensor:
        embeddings = lm.get_input_embeddings()(batch["input_ids"]).requires_grad_()
        position_ids = left_pad_positions(batch["attention_mask"])
        hidden = lm.get_decoder()(
            inputs_embeds=embeddings, attention_mask=batch["attention_mask"], position_ids=position_ids
        ).last_hidden_state
        rows, positions = labelled_positions(batch["labels"])
        logits = lm.get_output_embeddings()(hidden[rows, positions]).float()
        return F.cross_entropy(logits, batch["labels"][rows, positions + 1]) + stand_in.sum() * 0.0

    return loss


def rows_loss(model: FunctionCallingModel) -> Callable[[dict], torch.Tensor]:
    """FunctionCallingModel's answer loss (the rows on both sides)."""

    def loss(batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss

    return loss


@dataclass
class TrainVariant:
    """One way of taking a training step."""

    label: str
    loss: Callable[[dict], torch.Tensor]
    optimizer: torch.optim.Optimizer


PLAIN, LIMIT, ROWS, LOOP = (
    "train: plain backbone",
    "train: plain, logits at labels",
    "train: rows (TokMem)",
    "train: rows, loop over tools",
)


def train_variants(model: FunctionCallingModel, lr: float = 5e-3) -> list[TrainVariant]:
    """Plain backbone, plain at its limit, TokMem's rows, the seed's loop; each with its own AdamW (the rows' from
    build_optimizer, the plain ones' over a stand-in of the rows' size)."""
    size = sum(p.numel() for p in model.row_parameters())
    stand_ins = [nn.Parameter(torch.zeros(size, device=model.device)) for _ in range(2)]
    looped = LoopedToolModel.sharing(model)
    settings = TrainSettings(lr=lr)
    return [
        TrainVariant(PLAIN, plain_loss(model, stand_ins[0]), torch.optim.AdamW([stand_ins[0]], lr=lr)),
        TrainVariant(LIMIT, limit_loss(model, stand_ins[1]), torch.optim.AdamW([stand_ins[1]], lr=lr)),
        TrainVariant(ROWS, rows_loss(model), build_optimizer(model, settings, train_lora=False)),
        TrainVariant(LOOP, rows_loss(looped), build_optimizer(looped, settings, False)),
    ]


def train_step(variant: TrainVariant, batch: dict) -> torch.Tensor:
    """Forward, backward, AdamW step, gradients cleared; returns the detached loss."""
    loss = variant.loss(batch)
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def decode_batched(
    model: FunctionCallingModel, prompts: Sequence[list[int]], gold_tools: Sequence[list[str]], max_new_tokens: int
) -> list[list[int]]:
    """Ground-truth-tool decoding of all prompts at once, left-padded and KV-cached (the toolkit's own path)."""
    items = [
        {"input_ids": p, "labels": None, "gold_tools": g, "gold_calls": ["{}"] * len(g), "user_input": ""}
        for p, g in zip(prompts, gold_tools)
    ]
    batch = left_pad_collate(items, model.tokenizer.pad_token_id)
    outputs = model.generate_with_ground_truth_tools(
        batch["input_ids"], batch["attention_mask"], batch["gold_tools"], max_new_tokens=max_new_tokens
    )
    return [out.token_ids for out in outputs]


@torch.no_grad()
def decode_one_by_one(
    model: FunctionCallingModel, prompts: Sequence[list[int]], gold_tools: Sequence[list[str]], max_new_tokens: int
) -> list[list[int]]:
    """The naive way: one example at a time, the whole sequence re-run through the model at every step, no cache.

    The same decoding rules as the toolkit's path (`decoding_processors`: offered tools, call boundaries, forcing).
    """
    results = []
    for prompt, tools in zip(prompts, gold_tools):
        processors = model.decoding_processors(1, [tools])
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        new: list[int] = []
        for _ in range(max_new_tokens):
            scores = model(ids).logits[:, -1, :]
            for processor in processors:
                scores = processor(scores)
            next_id = int(scores.argmax(dim=-1))
            for processor in processors:
                processor.observe([next_id])
            new.append(next_id)
            if next_id == model.end_id:
                break
            ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
        results.append(new)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS on Linux (/proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak since the last reset: torch.cuda.max_memory_allocated, or the process's peak RSS (VmHWM, else getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2**20 if platform.system() == "Darwin" else usage / 1024


def memory_kind(device: torch.device) -> str:
    return "CUDA max allocated" if device.type == "cuda" else "process peak RSS"


def time_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> list[Timing]:
    """Time several callables round-robin (each round runs each once), so machine noise falls on all of them alike.

    `warmup` untimed rounds first; each callable's peak memory is the largest over its timed calls.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    seconds: list[list[float]] = [[] for _ in fns]
    peaks: list[float | None] = [None for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            synchronize(device)
            reset_peak_memory(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds[index].append(time.perf_counter() - start)
            peak = peak_memory_mb(device)
            if peak is not None:
                peaks[index] = max(peak, peaks[index] or 0.0)
    return [Timing(s, p) for s, p in zip(seconds, peaks)]


def timing_rows(labels: Sequence[str], timings: Sequence[Timing]) -> list[dict]:
    """One figure row per measurement; `ratio` is its median over the first row's."""
    rows = [
        {"label": label, "seconds": t.seconds, "median_s": t.median, "min_s": min(t.seconds), "peak_mb": t.peak_mb}
        for label, t in zip(labels, timings)
    ]
    for row in rows:
        row["ratio"] = row["median_s"] / rows[0]["median_s"]
    return rows


BATCHED, ONE_BY_ONE = "eval: GT tools, batched + KV cache", "eval: one at a time, no cache"
RATIO_NAMES = {
    "bank_vs_plain": "TokMem step / plain backbone's usual step (full logits, its own loss)",
    "bank_vs_limit": "TokMem step / plain backbone with logits only at labelled positions",
    "loop_vs_bank": "seed-style per-tool loop / TokMem step",
    "decode_speedup": "one-by-one uncached / batched cached decoding",
    "bank_peak_vs_plain": "peak memory of the TokMem step / the plain step's",
}


def ratios(train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> dict[str, float | None]:
    """The headline ratios of one shape (medians; peaks as measured, None where no peak was measured)."""
    train = {row["label"]: row for row in train_rows}
    decode = {row["label"]: row for row in eval_rows}

    def over(top: dict, bottom: dict, key: str = "median_s") -> float | None:
        return top[key] / bottom[key] if top[key] is not None and bottom[key] else None

    return {
        "bank_vs_plain": over(train[ROWS], train[PLAIN]),
        "bank_vs_limit": over(train[ROWS], train[LIMIT]),
        "loop_vs_bank": over(train[LOOP], train[ROWS]),
        "decode_speedup": over(decode[ONE_BY_ONE], decode[BATCHED]),
        "bank_peak_vs_plain": over(train[ROWS], train[PLAIN], "peak_mb"),
    }


def bench_shape(
    shape: ShapeSpec, device: torch.device, dtype: torch.dtype, seed: int, decouple_embeddings: bool = False,
    training_pass: str = "auto",
) -> dict:
    """Every measurement on one shape; returns its figures.

    The rows are re-initialised after the training steps: rows trained on random data make a random model pick
    tools everywhere, which would end ground-truth decoding after a few tokens instead of a realistic answer length.
    """
    start = time.perf_counter()
    model = load_shape_model(shape, device, dtype, seed, decouple_embeddings, training_pass)
    params = model.parameter_breakdown()
    model_vocab = model.causal_lm.config.vocab_size
    logger.info("%s: %s, %.1fM backbone parameters, %d tools, built in %.1f s", shape.name, shape.describe(),
                params["backbone"] / 1e6, shape.num_tools, time.perf_counter() - start)

    batch = make_train_batch(model, shape.batch_size, shape.seq_len, seed)
    variants = train_variants(model)
    model.train()
    timings = time_interleaved(
        [lambda v=v: train_step(v, batch) for v in variants], device, shape.warmup, shape.repeats
    )
    model.eval()
    model.initialize_rows(seed=seed)
    train_rows = timing_rows([v.label for v in variants], timings)
    for row in train_rows:
        logger.info("%s  %s: median %s", shape.name, row["label"], format_seconds(row["median_s"]))

    prompts, gold = make_eval_prompts(model, shape.eval_examples, shape.prompt_len, seed)
    decoders = {BATCHED: decode_batched, ONE_BY_ONE: decode_one_by_one}
    decoded: dict[str, list[list[int]]] = {}

    def runner(label: str) -> Callable[[], None]:
        def run() -> None:
            decoded[label] = decoders[label](model, prompts, gold, shape.new_tokens)

        return run

    decode_batched(model, prompts[:2], gold[:2], 2)
    decode_one_by_one(model, prompts[:1], gold[:1], 2)
    timings = time_interleaved([runner(label) for label in decoders], device, 0, shape.eval_repeats)
    eval_rows = timing_rows(list(decoders), timings)
    for row in eval_rows:
        logger.info("%s  %s: median %s", shape.name, row["label"], format_seconds(row["median_s"]))
    batched_ids, naive_ids = (decoded[label] for label in decoders)
    same_ids = batched_ids == naive_ids
    if not same_ids:
        logger.warning("%s: batched and one-by-one decoding differ (numerics of %s on %s)", shape.name, dtype, device)

    del model, batch, variants
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "shape": dataclasses.asdict(shape),
        "vocab_size": model_vocab,
        "parameters": params,
        "train": train_rows,
        "eval": eval_rows,
        "eval_generated_tokens": sum(len(ids) for ids in batched_ids),
        "eval_same_ids": same_ids,
        "ratios": ratios(train_rows, eval_rows),
    }



# ---------------------------------------------------------------------------------------------------------------------
# Scale: cost curves against the number of tools, the answer's length and the offered tools

SCALE_TOOLS = (10, 100, 1000, 10000)
SCALE_ANSWERS = (16, 64, 256)
SCALE_OFFERED = (10, 100, 1000)
SCALE_FIXED_TOOLS = 100  # tools of the answer-length curve
QUICK_SCALE = {"tools": (10, 100, 1000), "answers": (16, 64), "offered": (10, 100)}


@dataclass(frozen=True)
class ScaleSettings:
    """The points of the three curves, on one shape."""

    tools: Sequence[int] = SCALE_TOOLS
    answers: Sequence[int] = SCALE_ANSWERS
    offered: Sequence[int] = SCALE_OFFERED
    prompt_len: int = 64  # the training prompt before the answer (answer curve) or half of seq_len (tools curve)


def fitted_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y over log x (None with fewer than two positive points)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def step_point(model: FunctionCallingModel, shape: ShapeSpec, batch: dict, device: torch.device) -> dict:
    """Median step time and peak memory of the plain backbone and of TokMem on one batch, interleaved."""
    variants = [v for v in train_variants(model) if v.label in (PLAIN, ROWS)]
    model.train()
    plain, rows = time_interleaved([lambda v=v: train_step(v, batch) for v in variants], device, shape.warmup,
                                   shape.repeats)
    model.eval()
    model.initialize_rows(seed=0)
    return {"plain_s": plain.median, "tokmem_s": rows.median, "ratio": rows.median / plain.median,
            "extra_s": rows.median - plain.median, "plain_peak_mb": plain.peak_mb, "tokmem_peak_mb": rows.peak_mb,
            "vocab_size": model.causal_lm.get_input_embeddings().weight.shape[0]}


NEVER_STOP = (-1,)  # a stop id no token has: every decoding of the offered-tools curve runs all its steps


def decode_point(model: FunctionCallingModel, shape: ShapeSpec, offered: int, device: torch.device) -> dict:
    """Greedy decoding (the model picks its tools, under the toolkit's processors) of `shape.eval_examples` prompts
    with `offered` tools offered: median time per decoding step. No row stops early (NEVER_STOP), so every offer runs
    the same `shape.new_tokens` steps over the same prompts: a random model would otherwise stop at different steps
    under different offers, and the prompt's pass would be spread over a different number of steps."""
    prompts, _ = make_eval_prompts(model, shape.eval_examples, shape.prompt_len, seed=0)
    input_ids, attention_mask = left_pad(prompts, model.tokenizer.pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    model.set_generation_tools(model.tool_names[:offered])
    steps: list[int] = []

    def run() -> None:
        processors = model.decoding_processors(input_ids.shape[0])
        ids = greedy_decode(model.decoding_step, input_ids, attention_mask, shape.new_tokens, NEVER_STOP, processors)
        steps.append(max(len(row) for row in ids))

    (timing,) = time_interleaved([run], device, 1, shape.eval_repeats)
    model.set_generation_tools(None)
    return {"offered": offered, "decode_s": timing.median, "steps": steps[-1],
            "per_step_s": timing.median / max(1, steps[-1]), "peak_mb": timing.peak_mb}


def bench_scale(shape: ShapeSpec, scale: ScaleSettings, device: torch.device, dtype: torch.dtype, seed: int,
                training_pass: str = "auto") -> dict:
    """The three curves on `shape`: step time and peak memory against the number of tools (the same batch, half
    prompt, half answer) and against the answer's length (SCALE_FIXED_TOOLS tools, a fixed prompt), and greedy
    decoding time per step against the offered tools (of a memory holding the most); each with its fitted slopes.

    The plain backbone is the same backbone with the same vocabulary: tools past the tokenizer's reserved tokens grow
    the embedding and head of both, so the TokMem step's extra cost (`extra_s`) is what the rows add."""
    tools_points, answer_points, decode_points = [], [], []
    memory_sizes = sorted(set(scale.tools) | {max(scale.offered), SCALE_FIXED_TOOLS})
    for num_tools in memory_sizes:
        model = load_shape_model(dataclasses.replace(shape, num_tools=num_tools), device, dtype, seed,
                                 training_pass=training_pass)
        if num_tools in scale.tools:
            batch = make_train_batch(model, shape.batch_size, shape.seq_len, seed)
            tools_points.append({"tools": num_tools, **step_point(model, shape, batch, device)})
            logger.info("scale: %d tools: %s", num_tools, tools_points[-1])
        if num_tools == SCALE_FIXED_TOOLS:
            for answer in scale.answers:
                batch = make_train_batch(model, shape.batch_size, scale.prompt_len + answer, seed, answer_len=answer)
                answer_points.append({"answer_len": answer, **step_point(model, shape, batch, device)})
                logger.info("scale: answer %d: %s", answer, answer_points[-1])
        if num_tools == max(scale.offered):
            decode_points = [decode_point(model, shape, offered, device) for offered in scale.offered]
            logger.info("scale: decoding: %s", decode_points)
        del model
        gc.collect()
    slopes = {
        "tools": {key: fitted_slope([p["tools"] for p in tools_points], [p[key] for p in tools_points])
                  for key in ("plain_s", "tokmem_s", "extra_s", "plain_peak_mb", "tokmem_peak_mb")},
        "answer_len": {key: fitted_slope([p["answer_len"] for p in answer_points], [p[key] for p in answer_points])
                       for key in ("plain_s", "tokmem_s", "extra_s", "plain_peak_mb", "tokmem_peak_mb")},
        "offered": {"per_step_s": fitted_slope([p["offered"] for p in decode_points],
                                               [p["per_step_s"] for p in decode_points])},
    }
    return {"shape": dataclasses.asdict(shape), "training_pass": resolve_training_pass(training_pass, device),
            "tools": tools_points, "answer_len": answer_points, "offered": decode_points, "slope": slopes}


def format_scale(scale: dict) -> str:
    """The three curves as tables, each with its fitted log-log slopes."""
    def peak(value: float | None) -> str:
        return f"{value:.0f}" if value is not None else "-"

    def slope(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    lines = [f"scale on {scale['shape']['name']} ({scale['training_pass']} pass; batch {scale['shape']['batch_size']})"]
    for key, label in (("tools", "tools"), ("answer_len", "answer")):
        lines.append(f"{label:>8} {'vocab':>7} {'plain':>10} {'TokMem':>10} {'ratio':>6} {'plain MB':>9} {'TokMem MB':>10}")
        for point in scale[key]:
            lines.append(f"{point[key]:>8} {point['vocab_size']:>7} {format_seconds(point['plain_s']):>10} "
                         f"{format_seconds(point['tokmem_s']):>10} {point['ratio']:>6.2f} "
                         f"{peak(point['plain_peak_mb']):>9} {peak(point['tokmem_peak_mb']):>10}")
        fitted = scale["slope"][key]
        lines.append("  log-log slopes: " + ", ".join(f"{name} {slope(value)}" for name, value in fitted.items()))
    lines.append(f"{'offered':>8} {'steps':>6} {'decode':>10} {'per step':>10}")
    for point in scale["offered"]:
        lines.append(f"{point['offered']:>8} {point['steps']:>6} {format_seconds(point['decode_s']):>10} "
                     f"{format_seconds(point['per_step_s']):>10}")
    lines.append(f"  log-log slope of the time per step: {slope(scale['slope']['offered']['per_step_s'])}")
    return "\n".join(lines)


def plot_scale(scale: dict, path: str | Path) -> None:
    """Three log-log panels (step time against tools and answer length, decoding time per step against offered
    tools), each series labelled with its fitted slope; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, key, title in ((axes[0], "tools", "step time vs tools"), (axes[1], "answer_len", "step vs answer")):
        xs = [p[key] for p in scale[key]]
        for series, label in (("plain_s", "plain"), ("tokmem_s", "TokMem")):
            axis.loglog(xs, [p[series] for p in scale[key]], marker="o",
                        label=f"{label} (slope {scale['slope'][key][series] or 0:.2f})")
        axis.set_title(title)
        axis.set_xlabel(key)
        axis.set_ylabel("seconds")
        axis.legend()
    xs = [p["offered"] for p in scale["offered"]]
    axes[2].loglog(xs, [p["per_step_s"] for p in scale["offered"]], marker="o",
                   label=f"greedy (slope {scale['slope']['offered']['per_step_s'] or 0:.2f})")
    axes[2].set_title("decoding per step vs offered tools")
    axes[2].set_xlabel("offered tools")
    axes[2].legend()
    figure.tight_layout()
    atomic_write_with(Path(path), lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Report


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def format_table(figures: dict) -> str:
    """The final table: one line per measurement, the ratio to the first line of its group."""
    settings = figures["settings"]
    lines = [
        f"device {settings['device']} ({settings['device_name']}), {settings['dtype']}, torch {settings['torch']}, "
        f"{settings['threads']} threads, {'decoupled' if settings['decouple_embeddings'] else 'coupled'} rows; "
        f"peak MB: {settings['memory']}",
    ]
    header = f"{'shape':<8} {'measurement':<36} {'workload':<26} {'time':>10} {'x ref':>8} {'peak MB':>9}"
    lines += [header, "-" * len(header)]
    for result in figures["results"]:
        shape = result["shape"]
        train_size = f"{shape['batch_size']}x{shape['seq_len']} tok, {shape['num_tools']} tools"
        eval_size = f"{shape['eval_examples']} prompts, <={shape['new_tokens']} new"
        for group, size in (("train", train_size), ("eval", eval_size)):
            for row in result[group]:
                peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
                lines.append(
                    f"{shape['name']:<8} {row['label']:<36} {size:<26} {format_seconds(row['median_s']):>10} "
                    f"{row['ratio']:>7.2f}x {peak:>9}"
                )
    lines.append("x ref: time over the first line of its group (plain backbone; batched decoding).")
    names = list(RATIO_NAMES)
    lines += ["", f"{'shape':<8} " + " ".join(f"{name:>18}" for name in names)]
    for result in figures["results"]:
        values = [result["ratios"][name] for name in names]
        lines.append(f"{result['shape']['name']:<8} " + " ".join(
            f"{value:>17.2f}x" if value is not None else f"{'-':>18}" for value in values))
    lines += [f"  {name}: {meaning}" for name, meaning in RATIO_NAMES.items()]
    lines.append("")
    for result in figures["results"]:
        shape = result["shape"]
        lines.append(
            f"{shape['name']}: {shape['num_layers']}L h{shape['hidden_size']} vocab {result['vocab_size']}, "
            f"{result['parameters']['backbone'] / 1e6:.1f}M backbone parameters; training: median of "
            f"{shape['repeats']} after {shape['warmup']} warm-up, rounds interleaved; decoding: median of "
            f"{shape['eval_repeats']}, {result['eval_generated_tokens']} tokens, batched and one-by-one ids "
            f"identical: {result['eval_same_ids']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None):
    parser = CliParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to measure")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (about 30 s on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.add_argument("--num_tools", type=positive_int,
                        help="tools in the rows (default 200; past the 248 reserved tokens the vocabulary grows)")
    parser.add_argument("--batch_size", type=positive_int, help="training batch (default: tiny 8, 1b-like 1)")
    parser.add_argument("--seq_len", type=positive_int, help="training sequence length (default 128)")
    parser.add_argument("--eval_examples", type=positive_int, help="prompts decoded (default: tiny 16, 1b-like 4)")
    parser.add_argument("--prompt_len", type=positive_int, help="longest prompt (default: tiny 64, 1b-like 32)")
    parser.add_argument("--new_tokens", type=positive_int,
                        help="most new tokens per prompt (default: tiny 48, 1b-like 16)")
    parser.add_argument("--layers_1b", type=positive_int, help="decoder layers of the 1b-like shape (default 2)")
    parser.add_argument("--repeats", type=positive_int,
                        help="timed training steps per variant (default: tiny 5, 1b-like 3; quick 3 and 1)")
    parser.add_argument("--warmup", type=int, help="untimed training steps per variant (default: tiny 2, else 1)")
    parser.add_argument("--eval_repeats", type=positive_int,
                        help="timed decoding runs per way (default: tiny 3, 1b-like 1; quick 1)")
    parser.add_argument("--decouple_embeddings", action="store_true", help="separate input and output tool rows")
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="write the figures to this JSON file (atomically)")
    parser.add_argument("--training_pass", default="auto", choices=TRAINING_PASSES,
                        help="TokMem's training pass (model.resolve_training_pass; auto: one on CUDA, split on CPU)")
    parser.add_argument("--scale", action="store_true",
                        help="cost curves on the first of --shapes (default tiny): step time and peak memory against "
                             f"tools {SCALE_TOOLS} and answer length {SCALE_ANSWERS}, greedy decoding against offered "
                             f"tools {SCALE_OFFERED}; tables, log-log slopes, and a plot beside --json")
    parser.add_argument("--scale_tools", type=_int_list, help="tool counts of --scale (comma list)")
    parser.add_argument("--scale_answers", type=_int_list, help="answer lengths of --scale (comma list)")
    parser.add_argument("--scale_offered", type=_int_list, help="offered tools of --scale (comma list)")
    parser.add_argument("--plot", help="PNG of the --scale curves (default: --json's path with .png)")
    args = parser.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup: expected an integer >= 0")
    return args


def _int_list(text: str) -> tuple[int, ...]:
    """A comma list of positive integers (argparse type)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def scale_settings(args) -> ScaleSettings:
    """The --scale points: the defaults (fewer with --quick), then the explicit lists."""
    base = ScaleSettings(**QUICK_SCALE) if args.quick else ScaleSettings()
    given = {"tools": args.scale_tools, "answers": args.scale_answers, "offered": args.scale_offered}
    return dataclasses.replace(base, **{key: value for key, value in given.items() if value})


def selected_shapes(args, device: torch.device) -> list[ShapeSpec]:
    """The shapes to run: the defaults, CUDA or --quick sizes over them, then the explicit size flags."""
    overrides = {
        key: getattr(args, key)
        for key in ("num_tools", "batch_size", "seq_len", "eval_examples", "prompt_len", "new_tokens", "warmup",
                    "repeats", "eval_repeats")
        if getattr(args, key) is not None
    }
    shapes = []
    for name in args.shapes:
        shape = SHAPES[name]
        if args.quick:
            shape = dataclasses.replace(shape, **QUICK_SIZES[name])
        elif device.type == "cuda":
            shape = dataclasses.replace(shape, **CUDA_SIZES[name])
        if name == "1b-like" and args.layers_1b is not None:
            shape = dataclasses.replace(shape, num_layers=args.layers_1b)
        shapes.append(dataclasses.replace(shape, **overrides))
    return shapes


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def warn_if_busy(device: torch.device) -> None:
    """CPU timings with several threads degrade sharply when other processes hold cores: say so up front."""
    load = load_average()
    threads = torch.get_num_threads()
    if device.type == "cpu" and load is not None and threads > 1 and load >= 0.5:
        logger.warning(
            "load average %.2f before starting: other processes are using the CPU, and %d torch threads then wait on "
            "each other at every op (small shapes suffer most); for steadier figures use --threads 1 or a quiet "
            "machine", load, threads,
        )


def run_benchmark(args) -> dict:
    """Measure every selected shape; returns the figures (settings + one result per shape)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    avoid_cudnn_attention(device)  # before any step: the toolkit's models turn it off, so every line runs without it
    warn_if_busy(device)
    settings = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "quick": bool(args.quick),
        "seed": args.seed,
        "memory": memory_kind(device),
        "decouple_embeddings": args.decouple_embeddings,
        "load_average_start": load_average(),
    }
    settings["training_pass"] = resolve_training_pass(args.training_pass, device)
    if args.scale:
        set_seed(args.seed)
        shape = selected_shapes(args, device)[0]
        scale = bench_scale(shape, scale_settings(args), device, dtype, args.seed, args.training_pass)
        settings["load_average_end"] = load_average()
        return {"settings": settings, "scale": scale}
    results = []
    for shape in selected_shapes(args, device):
        set_seed(args.seed)
        results.append(
            bench_shape(shape, device, dtype, args.seed, args.decouple_embeddings, args.training_pass)
        )
    settings["load_average_end"] = load_average()
    return {"settings": settings, "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    figures = run_benchmark(args)
    figures["settings"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(format_scale(figures["scale"]) if args.scale else format_table(figures))
    if args.json_path:
        atomic_write_json(args.json_path, figures)
        logger.info("figures written to %s", args.json_path)
    plot = args.plot or (str(Path(args.json_path).with_suffix(".png")) if args.json_path else None)
    if args.scale and plot:
        plot_scale(figures["scale"], plot)
        logger.info("plot written to %s", plot)
    logger.info("done in %.0f s", figures["settings"]["wall_seconds"])
    return 0


if __name__ == "__main__":
    run_cli(main)
