"""The embedded default backbone: a tiny Llama-3 style causal LM pretrained on CPU for function calling, no download.

`python tiny_backbone.py` trains a byte-level BPE tokenizer carrying the Llama-3 special tokens and chat template on the
synthetic xLAM corpus, pretrains a small `LlamaForCausalLM` (tied embeddings, every weight trainable) on function
calling over synthetic tools the experiments never use (ranks 201-400, the default rounds use ranks 1-200 at most, and
spare tools of the corpus's grammar that no corpus row calls), scores greedy generation on held-out samples of those
tools, and saves everything with `save_pretrained` to `models/tiny-llama-fc/`. Each pretraining tool is one reserved special token, so the frozen backbone learns the grammar
"tool token, then a JSON object whose values come from the query" that TokMem's tool memory plugs into.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import regex as re
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from common import (CliParser, UserError, atomic_write_json, build_lock, non_negative_int, positive_float, positive_int,
                    replace_dir, run_cli, set_seed, setup_logging, unit_interval)
from dataset import IGNORE_INDEX, build_answer_ids, build_prompt_ids, end_of_turn_id, icl_answer_text, tool_system_prompt
from decoding import causal_lm_step, decode_prompts
from eval import parse_function_call, score_predictions
from round_files import file_sha256

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_BACKBONE_DIR = REPO_ROOT / "models" / "tiny-llama-fc"
DEFAULT_MODEL_NAME = str(DEFAULT_BACKBONE_DIR)

REPORT_FILE = "backbone_report.json"
MODEL_CARD = "README.md"  # the backbone's documentation, kept across rebuilds
FINISHED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", REPORT_FILE)

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
EOT_TOKEN = "<|eot_id|>"
NUM_RESERVED_TOKENS = 248


def reserved_token(index: int) -> str:
    """The text of Llama-3's reserved special token number `index`."""
    return f"<|reserved_special_token_{index}|>"


# Llama-3.1/3.2 special tokens, in their id order (they follow the BPE vocabulary, as in Llama-3).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    reserved_token(0),
    reserved_token(1),
    PAD_TOKEN,
    reserved_token(2),
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    EOT_TOKEN,
    "<|python_tag|>",
    *(reserved_token(i) for i in range(3, NUM_RESERVED_TOKENS)),
)

# Pre-tokenizer splits (`BuildSettings.split`). "llama3" is Llama-3's: contractions, words with their leading space or
# punctuation, numbers of up to three digits, punctuation runs, newlines and spaces. "digits" cuts numbers into single
# digits. "words" also keeps spaces and punctuation off words, so that a value is the same tokens in the query (` Oslo`
# there would be one token) and in the JSON (`"Oslo`), and a tool name's parts (`get`, `_`, `weather`) are the tokens
# of the query's words: copying and matching become exact token matches. backbone_report.json measures each.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = {
    "llama3": LLAMA3_SPLIT_PATTERN,
    "digits": LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"),
    "words": r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

PRETRAIN_FIRST_RANK = 201
PRETRAIN_LAST_RANK = 400
# The synthetic corpus the backbone learns from: xlam_datasets' default seed, so that for the default data the
# pretraining tools (ranks 201-400) and the experiments' tools (ranks 1-200) are disjoint.
CORPUS_SEED = 42
# The second and third stage draw their samples' formats and values from seed + these.
CONSOLIDATION_SEED_OFFSET = 7
READING_SEED_OFFSET = 11
# Rows written for each spare pretraining tool (BuildSettings.spare_tools), about what a tail tool of the corpus has.
SPARE_ROWS_PER_TOOL = 100


@dataclass
class BuildSettings:
    """Everything that decides a build: data, tokenizer, model size, optimisation and evaluation."""

    seed: int = 0
    corpus_seed: int = CORPUS_SEED
    split: str = "digits"
    vocab_size: int = 6144
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    # Positions cover the default in-context run (icl_baseline.sh, 20 tools: up to 1932 prompt tokens + 256 new ones);
    # RoPE computes from positions, so the number changes no weight (training samples reach reading_max_length).
    max_position_embeddings: int = 4096
    max_length: int = 384
    steps: int = 10000
    batch_tokens: int = 2048
    learning_rate: float = 4e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    # Copying curriculum: this share of samples has its argument values replaced, in the query and in the answer, by
    # fresh ones (random words from the corpus, made-up words, random digits), so that only copying predicts them.
    # Copying starts late with it (the loss falls from 1.2 to 0.4 between steps 3200 and 5000), hence 10000 steps.
    fresh_value_fraction: float = 0.7
    # In-context samples (stage 1 and 2 have none by default; the reading stage below mixes them in): this share of
    # samples lists icl_min_listed to icl_max_listed described tools, the gold ones among them, in the system prompt of
    # icl_baseline.py; in this share of those every listed tool gets a made-up name, so that only reading the list
    # helps. The loss on the tool-name tokens of their answers is weighted by name_loss_weight.
    icl_fraction: float = 0.0
    icl_min_listed: int = 2
    icl_max_listed: int = 8
    icl_alias_fraction: float = 0.5
    name_loss_weight: float = 1.0
    # Second stage (consolidation): after `steps`, this many more steps (warm-up then cosine again, at
    # consolidation_learning_rate) on a new draw of the samples, fresh values included. 6000 more steps at half the
    # rate took held-out exact match from 0.403 to 0.707.
    consolidation_steps: int = 6000
    consolidation_learning_rate: float = 2e-3
    # Third stage (reading): this many steps on a new draw in which reading_icl_fraction of the samples are in the
    # in-context format, up to reading_max_length tokens, in batches of reading_batch_tokens, with the name tokens
    # weighted by reading_name_loss_weight. Copying has to come first: in-context samples mixed in from the start took
    # most steps and stopped TokMem learning, and at weight 1 the backbone copied arguments right but picked a listed
    # name nearly at random (its model card, models/tiny-llama-fc/README.md).
    reading_steps: int = 4000
    reading_icl_fraction: float = 0.5
    reading_learning_rate: float = 2e-3
    reading_max_length: int = 1408
    reading_batch_tokens: int = 8192
    reading_name_loss_weight: float = 10.0
    # Tools of the corpus's grammar that no corpus row calls, pretrained beside ranks 201-400 in the reserved tokens
    # left (248 - 200): those whose domain object no rank 201-400 has first. Without them the round-3 tools whose
    # object the backbone never saw (daily calories, credit score, betting odds) got a pretraining tool's keys.
    spare_tools: int = 48
    max_samples_per_tool: int = 60
    train_size: int = 24000
    test_size: int = 300
    train_max_calls: int = 3
    test_max_calls: int = 3
    eval_samples: int = 300
    icl_eval_samples: int = 100
    eval_batch_size: int = 64
    max_new_tokens: int = 160
    # The weights depend on the thread count (it changes how float sums are split). Two threads: 8 steps/s on 2 idle
    # cores, where one thread makes 5; but two threads fell to 1.6 steps/s when another process shared the cores,
    # where one thread kept 4.7. The committed backbone is a download-free artefact, so its build favours speed.
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_length", "reading_max_length") if self.reading_steps else ("max_length",):
            if getattr(self, name) > self.max_position_embeddings:
                raise ValueError(f"{name} {getattr(self, name)} exceeds max_position_embeddings "
                                 f"{self.max_position_embeddings}")
        if self.icl_min_listed > self.icl_max_listed:
            raise ValueError(f"icl_min_listed {self.icl_min_listed} exceeds icl_max_listed {self.icl_max_listed}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                             f"{self.num_kv_heads} must divide")
        if self.split not in SPLIT_PATTERNS:
            raise ValueError(f"split must be one of {sorted(SPLIT_PATTERNS)}, got {self.split!r}")
        left = NUM_RESERVED_TOKENS - (PRETRAIN_LAST_RANK - PRETRAIN_FIRST_RANK + 1)
        if self.spare_tools > left:
            raise ValueError(f"spare_tools {self.spare_tools}: only {left} reserved tokens are left after the corpus's "
                             f"ranks {PRETRAIN_FIRST_RANK}-{PRETRAIN_LAST_RANK}")

    def consolidation_stage(self) -> "BuildSettings":
        """The settings the second stage encodes and trains with: the first stage's data recipe, its own steps and rate."""
        return dataclasses.replace(self, steps=self.consolidation_steps, learning_rate=self.consolidation_learning_rate,
                                   consolidation_steps=0, reading_steps=0)

    def reading_stage(self) -> "BuildSettings":
        """The settings the reading stage encodes and trains with (its own steps, share, length, batch, weight, rate)."""
        return dataclasses.replace(self, steps=self.reading_steps, icl_fraction=self.reading_icl_fraction,
                                   learning_rate=self.reading_learning_rate, max_length=self.reading_max_length,
                                   batch_tokens=self.reading_batch_tokens, name_loss_weight=self.reading_name_loss_weight,
                                   consolidation_steps=0, reading_steps=0)

    def model_sizes(self) -> dict[str, int]:
        """The keyword arguments of `build_config` that set the model's shape."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }


class PretrainingData(NamedTuple):
    """Pretraining samples of the backbone's own tools, their descriptions and each tool's reserved-token index."""

    train: list[dict]
    test: list[dict]
    descriptions: dict[str, dict]
    tool_slots: dict[str, int]


class Example(NamedTuple):
    """One tokenized training sequence; labels are IGNORE_INDEX outside the answer; weights (None: all 1) scale each
    position's loss."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(texts: Iterable[str], vocab_size: int, split: str = "llama3") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the Llama-3 special tokens and chat template.

    `vocab_size` counts everything, the 256 special tokens included; they never split and take the last ids. `split`
    names the pre-tokenizer split (SPLIT_PATTERNS).
    """
    num_special = len(LLAMA3_SPECIAL_TOKENS)
    if vocab_size < num_special + 512:
        raise ValueError(f"vocab_size must be at least {num_special + 512}, got {vocab_size}")
    if split not in SPLIT_PATTERNS:
        raise ValueError(f"split must be one of {sorted(SPLIT_PATTERNS)}, got {split!r}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[split]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# The plain-text parts of the chat template (role names, blank lines), so that they tokenize compactly.
_CHAT_SCAFFOLD = "system\n\nuser\n\nassistant\n\n"


def corpus_texts(rows: Sequence[dict]) -> Iterator[str]:
    """Tokenizer training text: every query, answer and tool description of the corpus (all tools)."""
    seen_tools: set[str] = set()
    for row in rows:
        yield row["query"]
        yield _CHAT_SCAFFOLD
        for answer in _json_list(row.get("answers")):
            arguments = answer.get("arguments", {}) if isinstance(answer, dict) else {}
            yield json.dumps(arguments, ensure_ascii=False)
            yield json.dumps({"name": answer.get("name"), "arguments": arguments}, ensure_ascii=False)
        for tool in _json_list(row.get("tools")):
            text = json.dumps(tool, ensure_ascii=False, separators=(",", ":"))
            if text not in seen_tools:
                seen_tools.add(text)
                yield text
    yield tool_system_prompt([])


def _json_list(text: Any) -> list:
    """A JSON-encoded list field of an xLAM row (an already decoded list is accepted too)."""
    if isinstance(text, list):
        return text
    if not isinstance(text, str):
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


# ---------------------------------------------------------------------------------------------------------------------
# Model


def build_config(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
) -> LlamaConfig:
    """A small Llama config for `tokenizer` (tied embeddings, pad/bos/eos ids set); intermediate defaults to 3x."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size {hidden_size}, heads {num_heads} and kv heads {num_kv_heads} do not divide")
    if intermediate_size is None:
        intermediate_size = 3 * hidden_size
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random_model(tokenizer, **sizes: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama for `tokenizer` (sizes as in `build_config`), float32, in eval mode."""
    config = build_config(tokenizer, **sizes)
    model = LlamaForCausalLM(config)
    eot = end_of_turn_id(tokenizer)
    eos = [eot] + [i for i in (tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN),) if isinstance(i, int) and i != eot]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.eval()
    return model


def refresh_unseen_rows(model: LlamaForCausalLM, tokenizer, seen: set[int], seed: int) -> int:
    """Give each BPE token that no training sequence contains a fresh (tied) embedding row, drawn per dimension with
    the mean and spread of the seen tokens' rows; the number refreshed.

    Pretraining only ever pushes such a row away from the answers, so all of them collapse onto one direction (cosine
    1.00 between `[` and `ompare` after 10000 steps) and no adapter on the frozen model can tell them apart; the text
    markers of the LoRA baseline (`[tool_7]`) are made of such tokens. A fresh row is what a token added to a trained
    model gets. Special tokens keep their rows (TokMem initialises its own). The build refreshes after the copying
    stages and again after the reading stage, whose training pushes the unseen rows together once more."""
    first_special = min(tokenizer.convert_tokens_to_ids(list(LLAMA3_SPECIAL_TOKENS)))
    unseen = [i for i in range(first_special) if i not in seen]
    rows = model.get_input_embeddings().weight
    seen_rows = rows[sorted(i for i in seen if i < first_special)].detach()
    generator = torch.Generator().manual_seed(seed)
    fresh = torch.randn(len(unseen), rows.shape[1], generator=generator).to(rows.device)
    with torch.no_grad():
        rows[unseen] = seen_rows.mean(0) + fresh * seen_rows.std(0)
    return len(unseen)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining data


def load_corpus(seed: int = CORPUS_SEED) -> list[dict]:
    """The synthetic xLAM rows (every tool)."""
    import xlam_datasets

    return xlam_datasets.load_xlam_rows("synthetic", None, seed)


def spare_tools(own: Sequence[str], count: int) -> list:
    """`count` tools of the corpus's grammar that no corpus row calls (synthetic_xlam.spare_tools), those whose domain
    object none of `own` has first, each group by name."""
    import synthetic_xlam

    own = set(own)
    objects = {tool.domain_object for tool in synthetic_xlam.CANDIDATES if tool.name in own}
    spare = synthetic_xlam.spare_tools()
    return sorted(spare, key=lambda tool: (tool.domain_object in objects, tool.name))[:count]


def pretraining_samples(seed: int, rows: Sequence[dict] | None = None, settings: BuildSettings | None = None) -> PretrainingData:
    """Train/test samples of the pretraining tools: ranks 201-400 of the synthetic corpus and `spare_tools` tools no
    corpus row calls, none of them ever used by the rounds."""
    import synthetic_xlam
    import xlam_datasets

    settings = settings or BuildSettings(seed=seed)
    rows = load_corpus(settings.corpus_seed) if rows is None else rows
    ranked = xlam_datasets.rank_tools(rows)
    last = min(PRETRAIN_LAST_RANK, len(ranked), PRETRAIN_FIRST_RANK - 1 + NUM_RESERVED_TOKENS)
    if last < PRETRAIN_FIRST_RANK + 9:
        raise UserError(f"the corpus ranks only {len(ranked)} tools; the backbone needs ranks {PRETRAIN_FIRST_RANK}+")
    ranked = list(ranked[:last])
    if settings.spare_tools:  # BuildSettings bounds it by the reserved tokens ranks 201-400 leave
        spare = spare_tools(ranked[PRETRAIN_FIRST_RANK - 1:], settings.spare_tools)
        rows = [*rows, *synthetic_xlam.generate_tool_rows(spare, SPARE_ROWS_PER_TOOL, settings.corpus_seed)]
        ranked += [tool.name for tool in spare]
    cut = xlam_datasets.CutSettings(settings.max_samples_per_tool, settings.train_size, settings.test_size,
                                    settings.train_max_calls, settings.test_max_calls, seed=seed)
    # The spare tools rank after the corpus's; without them the samples are those of ranks 201-400 alone.
    train, test, descriptions = xlam_datasets.build_round(rows, ranked, PRETRAIN_FIRST_RANK, len(ranked), cut)
    slots = {name: rank - PRETRAIN_FIRST_RANK for rank, name in enumerate(ranked, start=1) if rank >= PRETRAIN_FIRST_RANK}
    return PretrainingData(train, test, descriptions, slots)


def slot_encoder(tokenizer, tool_slots: dict[str, int]):
    """The tool encoder of pretraining: a tool is its reserved special token."""
    ids = {name: tokenizer.convert_tokens_to_ids(reserved_token(slot)) for name, slot in tool_slots.items()}

    def encode_tool(name: str) -> list[int]:
        return [ids[name]]

    return encode_tool


def encode_memory_example(tokenizer, sample: dict, encode_tool) -> Example:
    """A TokMem-format example: chat prompt, then [tool token][arguments JSON]... [end of turn]; loss on the answer."""
    prompt = build_prompt_ids(tokenizer, sample["user_input"])
    answer = build_answer_ids(tokenizer, sample["tools"], sample["function_calls"], encode_tool)
    return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


# ---------------------------------------------------------------------------------------------------------------------
# Copying and reading curriculum

_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
_VALUE_PIECES = re.compile(r"\p{L}+|\p{N}|[^\p{L}\p{N}]+")


def word_pool(rows: Sequence[dict], min_length: int = 3) -> list[str]:
    """The lowercase words (letters only, at least `min_length`) of the corpus's queries, sorted."""
    words: set[str] = set()
    for row in rows:
        words.update(w.lower() for w in re.findall(r"\p{L}+", row["query"]) if len(w) >= min_length)
    return sorted(words)


def _cased_like(word: str, model: str) -> str:
    """`word` in the letter case of `model` (all capitals, capitalised or lowercase)."""
    if model.isupper() and len(model) > 1:
        return word.upper()
    return word.capitalize() if model[:1].isupper() else word


def fresh_value_like(text: str, rng: random.Random, words: Sequence[str]) -> str:
    """A new value of the same shape as `text`: each digit random (a leading non-zero digit stays non-zero), each short
    or all-capital letter run random letters of its length and case, each other word a corpus word or a made-up one."""
    pieces = []
    for piece in _VALUE_PIECES.findall(text):
        if piece.isdigit():
            low = 1 if not pieces and piece != "0" and len(text) > 1 else 0
            pieces.append(str(rng.randint(low, 9)))
        elif piece.isalpha():
            if len(piece) <= 3 or (piece.isupper() and len(piece) > 1):
                letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in piece)
                pieces.append("".join(c.upper() if m.isupper() else c for c, m in zip(letters, piece)))
            elif rng.random() < 0.5:
                pieces.append(_cased_like(rng.choice(words), piece))
            else:
                made_up = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
                pieces.append(_cased_like(made_up, piece))
        else:
            pieces.append(piece)
    return "".join(pieces)


def _value_text(value: Any) -> str | None:
    """How an argument value is written in a query (strings and numbers), else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _bounded(text: str) -> str:
    """A pattern matching `text` where no letter or digit adjoins it (so "3" does not match inside "2023")."""
    return rf"(?<![\p{{L}}\p{{N}}]){re.escape(text)}(?![\p{{L}}\p{{N}}])"


def _occurs(text: str, query: str) -> bool:
    return re.search(_bounded(text), query) is not None


def with_fresh_values(sample: dict, rng: random.Random, words: Sequence[str]) -> dict:
    """`sample` with every argument value that its query states replaced, there and in the calls, by a fresh value of
    the same shape (fresh_value_like); the sample unchanged when a replacement would break a value's match."""
    query = sample["user_input"]
    calls = [json.loads(call) for call in sample["function_calls"]]
    mapping: dict[str, str] = {}
    for arguments in calls:
        for value in arguments.values():
            text = _value_text(value)
            if text and text not in mapping and _occurs(text, query):
                fresh = fresh_value_like(text, rng, words)
                if isinstance(value, (int, float)):
                    try:
                        json.loads(fresh)
                    except json.JSONDecodeError:
                        continue
                mapping[text] = fresh
    if not mapping:
        return sample
    pattern = re.compile("|".join(_bounded(t) for t in sorted(mapping, key=len, reverse=True)))
    new_query = pattern.sub(lambda match: mapping[match.group(0)], query)
    new_calls = []
    for arguments in calls:
        renewed = {}
        for key, value in arguments.items():
            text = _value_text(value)
            if text in mapping:
                value = mapping[text] if isinstance(value, str) else json.loads(mapping[text])
                if not _occurs(_value_text(value), new_query):
                    return sample
            renewed[key] = value
        new_calls.append(json.dumps(renewed, ensure_ascii=False))
    return {**sample, "user_input": new_query, "function_calls": new_calls}


def made_up_tool_name(rng: random.Random, words: Sequence[str]) -> str:
    """A tool name that no corpus tool has: two or three random corpus words joined by underscores."""
    return "_".join(rng.choice(words) for _ in range(rng.randint(2, 3)))


def icl_listing(sample: dict, descriptions: dict[str, dict], rng: random.Random, low: int, high: int) -> list[dict]:
    """Descriptions offered in an in-context prompt: the gold tools plus distractors, shuffled."""
    gold = list(dict.fromkeys(sample["tools"]))
    total = max(len(gold), rng.randint(low, high))
    others = [name for name in descriptions if name not in gold]
    listed = gold + rng.sample(others, min(len(others), total - len(gold)))
    rng.shuffle(listed)
    return [descriptions[name] for name in listed]


def renamed(sample: dict, listing: list[dict], rng: random.Random, words: Sequence[str]) -> tuple[dict, list[dict]]:
    """The sample and its listing with every listed tool under a made-up name (the same in the list and the answer)."""
    names = {desc["name"]: made_up_tool_name(rng, words) for desc in listing}
    return ({**sample, "tools": [names[t] for t in sample["tools"]]},
            [{**desc, "name": names[desc["name"]]} for desc in listing])


def encode_icl_example(tokenizer, sample: dict, listing: list[dict], name_weight: float = 1.0) -> Example:
    """An in-context example: tool descriptions in the system prompt, JSON lines as the answer; loss on the answer,
    weighted by `name_weight` on the tokens of the tool names."""
    prompt = build_prompt_ids(tokenizer, sample["user_input"], system_prompt=tool_system_prompt(listing))
    text = icl_answer_text(sample["tools"], sample["function_calls"])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=name_weight != 1.0)
    answer = encoded["input_ids"] + [end_of_turn_id(tokenizer)]
    labels = [IGNORE_INDEX] * len(prompt) + answer
    if name_weight == 1.0:
        return Example(prompt + answer, labels)
    spans = name_spans(text, sample["tools"])
    weights = [name_weight if any(start < end and stop > begin for begin, end in spans) else 1.0
               for start, stop in encoded["offset_mapping"]]
    return Example(prompt + answer, labels, [0.0] * len(prompt) + weights + [1.0])


def name_spans(text: str, tools: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of each call's tool name in an in-context answer (icl_answer_text), in order."""
    spans, at = [], 0
    for tool in tools:
        start = text.index(json.dumps({"name": tool}, ensure_ascii=False)[1:-1], at) + len('"name": "')
        spans.append((start, start + len(tool)))
        at = spans[-1][1]
    return spans


def encode_training_set(tokenizer, data: PretrainingData, settings: BuildSettings, rng: random.Random,
                        words: Sequence[str] = ()) -> list[Example]:
    """Tokenize the pretraining samples, the curriculum's shares with fresh values, in the in-context format and
    under made-up tool names; drop those over max_length."""
    if (settings.fresh_value_fraction > 0 or settings.icl_alias_fraction > 0) and not words:
        raise ValueError("the copying and reading curriculum needs a word pool")
    encode_tool = slot_encoder(tokenizer, data.tool_slots)
    examples, dropped = [], 0
    for sample in data.train:
        if rng.random() < settings.fresh_value_fraction:
            sample = with_fresh_values(sample, rng, words)
        if rng.random() < settings.icl_fraction:
            listing = icl_listing(sample, data.descriptions, rng, settings.icl_min_listed, settings.icl_max_listed)
            if rng.random() < settings.icl_alias_fraction:
                sample, listing = renamed(sample, listing, rng, words)
            example = encode_icl_example(tokenizer, sample, listing, settings.name_loss_weight)
        else:
            example = encode_memory_example(tokenizer, sample, encode_tool)
        if len(example.input_ids) > settings.max_length:
            dropped += 1
            continue
        examples.append(example)
    if dropped:
        logger.info("dropped %d of %d training samples longer than %d tokens", dropped, len(data.train), settings.max_length)
    if not examples:
        raise UserError(f"no pretraining sample fits in --max_length {settings.max_length}")
    return examples


def length_batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length so that a padded batch holds at most `batch_tokens` tokens; shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels; loss weights too when an example carries them."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if all(e.weights is None for e in examples):
        return batch
    weights = mask.float()
    for row, example in enumerate(examples):
        if example.weights is not None:
            weights[row, : len(example.weights)] = torch.tensor(example.weights)
    return {**batch, "weights": weights}


def batch_stream(examples: Sequence[Example], batch_tokens: int, pad_id: int, rng: random.Random) -> Iterator[dict]:
    """Length-bucketed batches, epoch after epoch, forever."""
    lengths = [len(e.input_ids) for e in examples]
    while True:
        for batch in length_batches(lengths, batch_tokens, rng):
            yield collate([examples[i] for i in batch], pad_id)


# ---------------------------------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch with `threads` intra-op threads (0: all cores), restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def answer_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer) positions, their weighted mean when the batch has weights;
    the LM head runs on those positions only."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])
    if "weights" not in batch:
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])
    weights = batch["weights"][:, 1:][keep]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    return (losses * weights).sum() / weights.sum()


def pretrain(model: LlamaForCausalLM, examples: Sequence[Example], settings: BuildSettings, pad_id: int) -> list[float]:
    """Train every weight on the answer tokens for `settings.steps` steps (AdamW, warm-up then cosine); the losses."""
    rng = random.Random(settings.seed)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(0.9, 0.98),
    )
    warmup = max(1, int(settings.warmup_ratio * settings.steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps)
    stream = batch_stream(examples, settings.batch_tokens, pad_id, rng)
    losses: list[float] = []
    model.train()
    progress = tqdm(range(settings.steps), desc="pretraining backbone", unit="step", dynamic_ncols=True)
    for step in progress:
        loss = answer_loss(model, next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == settings.steps - 1:
            progress.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    progress.close()
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def greedy_generate(model, tokenizer, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts (decoding.decode_prompts), each cut before its end of turn."""
    stops = sorted({end_of_turn_id(tokenizer), tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN)})
    rows = decode_prompts(causal_lm_step(model), prompts, tokenizer.pad_token_id, batch_size, max_new_tokens, stops,
                          model.device)
    return [row[:-1] if row and row[-1] in stops else row for row in rows]


def parse_memory_answer(tokenizer, ids: Sequence[int], slot_tools: dict[int, str]) -> tuple[list[str], list[str]]:
    """Tools (by their token) and the arguments text after each, from a generated TokMem-format answer."""
    tools: list[str] = []
    calls: list[list[int]] = []
    for token in ids:
        if token in slot_tools:
            tools.append(slot_tools[token])
            calls.append([])
        elif calls:
            calls[-1].append(token)
    return tools, [tokenizer.decode(c, skip_special_tokens=True).strip() for c in calls]


def parse_icl_answer(text: str) -> tuple[list[str], list[str]]:
    """Tools and arguments JSON from in-context answer lines `{"name": ..., "arguments": {...}}` (read by
    eval.parse_function_call; an unreadable line is a call with no tool)."""
    tools, calls = [], []
    for line in filter(None, (line.strip() for line in text.splitlines())):
        call = parse_function_call(line)
        tools.append(str(call.get("name", "")) if call else "")
        calls.append(json.dumps(call.get("arguments"), ensure_ascii=False) if call else "")
    return tools, calls


def argument_accuracy(samples: Sequence[dict], predictions: Sequence[tuple[list[str], list[str]]]) -> float:
    """Share of gold argument values that the predicted call at the same position has under the same key (JSON-equal,
    so 20 and 20.0 are equal); a missing or unreadable call gets none of its gold arguments right."""
    right = total = 0
    for sample, (_, calls) in zip(samples, predictions, strict=True):
        for position, gold_text in enumerate(sample["function_calls"]):
            gold = json.loads(gold_text)
            total += len(gold)
            try:
                predicted = json.loads(calls[position]) if position < len(calls) else None
            except json.JSONDecodeError:
                predicted = None
            if isinstance(predicted, dict):
                right += sum(key in predicted and predicted[key] == value for key, value in gold.items())
    return right / total if total else 0.0


def score(samples: Sequence[dict], predictions: Sequence[tuple[list[str], list[str]]]) -> dict[str, float]:
    """Tool accuracy, tool F1, call F1 and exact match of eval.score_predictions (the toolkit's scores), the argument
    value accuracy, and the sample count."""
    metrics = score_predictions([
        {"predicted_tools": list(tools), "function_calls": list(calls), "gold_tools": sample["tools"],
         "gold_calls": sample["function_calls"]}
        for sample, (tools, calls) in zip(samples, predictions, strict=True)
    ])
    scores = {key: metrics[key] for key in ("tool_accuracy", "avg_tool_f1_score", "avg_f1_score", "exact_accuracy")}
    scores["argument_accuracy"] = argument_accuracy(samples, predictions)
    scores["total_examples"] = metrics["total_examples"]
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in scores.items()}


def evaluate_memory(model, tokenizer, data: PretrainingData, samples: Sequence[dict], settings: BuildSettings) -> dict:
    """Held-out scores in the TokMem format (a tool is its reserved token)."""
    encode_tool = slot_encoder(tokenizer, data.tool_slots)
    slot_tools = {encode_tool(name)[0]: name for name in data.tool_slots}
    prompts = [build_prompt_ids(tokenizer, s["user_input"]) for s in samples]
    outputs = greedy_generate(model, tokenizer, prompts, settings.eval_batch_size, settings.max_new_tokens)
    return score(samples, [parse_memory_answer(tokenizer, ids, slot_tools) for ids in outputs])


def evaluate_icl(model, tokenizer, data: PretrainingData, samples: Sequence[dict], settings: BuildSettings,
                 words: Sequence[str] = ()) -> dict:
    """Held-out scores in the in-context format (1-10 tools described in the system prompt, named in the answer);
    with `words`, every listed tool is under a made-up name, so only reading the list finds it."""
    rng = random.Random(settings.seed + 1)
    prompts, scored = [], []
    for sample in samples:
        listing = icl_listing(sample, data.descriptions, rng, settings.icl_min_listed, settings.icl_max_listed)
        if words:
            sample, listing = renamed(sample, listing, rng, words)
        scored.append(sample)
        prompts.append(build_prompt_ids(tokenizer, sample["user_input"], system_prompt=tool_system_prompt(listing)))
    outputs = greedy_generate(model, tokenizer, prompts, settings.eval_batch_size, settings.max_new_tokens)
    return score(scored, [parse_icl_answer(tokenizer.decode(ids, skip_special_tokens=True)) for ids in outputs])


def probe(model, tokenizer, data: PretrainingData, settings: BuildSettings, words: Sequence[str]) -> dict[str, dict]:
    """The held-out probe of backbone_report.json, on test samples of the backbone's own tools (never trained on):
    TokMem format with the corpus's values and with fresh values, in-context format with real and made-up names."""
    rng = random.Random(settings.seed + 2)
    memory_samples = data.test[: settings.eval_samples]
    icl_samples = data.test[: settings.icl_eval_samples]
    with torch_threads(settings.threads), torch.inference_mode():
        return {
            "held_out": evaluate_memory(model, tokenizer, data, memory_samples, settings),
            "held_out_fresh_values": evaluate_memory(
                model, tokenizer, data, [with_fresh_values(s, rng, words) for s in memory_samples], settings),
            "held_out_in_context": evaluate_icl(model, tokenizer, data, icl_samples, settings),
            "held_out_in_context_made_up_names": evaluate_icl(model, tokenizer, data, icl_samples, settings, words),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Build and cache


def train_stage(model: LlamaForCausalLM, tokenizer, data: PretrainingData, stage: BuildSettings, seed_offset: int,
                words: Sequence[str], losses: list[float], seen: set[int]) -> list[Example]:
    """One later stage: encode a new draw of the samples (seed + seed_offset) with the stage's settings and train on
    it; its losses extend `losses`, its tokens join `seen`; the stage's examples."""
    examples = encode_training_set(tokenizer, data, stage, random.Random(stage.seed + seed_offset), words)
    logger.info("stage of %d steps: %d examples, %.2f in the in-context format, up to %d tokens", stage.steps,
                len(examples), stage.icl_fraction, stage.max_length)
    losses += pretrain(model, examples, stage, tokenizer.pad_token_id)
    seen |= {token for example in examples for token in example.input_ids}
    return examples


def build_backbone(output_dir: str | os.PathLike, settings: BuildSettings) -> dict:
    """Train tokenizer and model and save them (plus the report) into `output_dir`, which must be empty or absent."""
    start = time.time()
    set_seed(settings.seed)
    output_dir = Path(output_dir)
    with torch_threads(settings.threads):
        rows = load_corpus(settings.corpus_seed)
        tokenizer = build_tokenizer(corpus_texts(rows), settings.vocab_size, settings.split)
        logger.info("tokenizer: %d tokens (%.1fs)", len(tokenizer), time.time() - start)
        data = pretraining_samples(settings.seed, rows, settings)
        words = word_pool(rows)
        rng = random.Random(settings.seed)
        examples = encode_training_set(tokenizer, data, settings, rng, words)
        logger.info(
            "pretraining on %d tools: %d examples, %d tokens; %d held-out samples",
            len(data.tool_slots),
            len(examples),
            sum(len(e.input_ids) for e in examples),
            len(data.test),
        )
        torch.manual_seed(settings.seed)
        model = build_random_model(tokenizer, **settings.model_sizes())
        logger.info("model: %.2fM parameters", count_parameters(model) / 1e6)
        train_start = time.time()
        losses = pretrain(model, examples, settings, tokenizer.pad_token_id)
        seen = {token for example in examples for token in example.input_ids}
        if settings.consolidation_steps:
            examples = train_stage(model, tokenizer, data, settings.consolidation_stage(), CONSOLIDATION_SEED_OFFSET,
                                   words, losses, seen)
        refreshed = refresh_unseen_rows(model, tokenizer, seen, settings.seed)
        logger.info("fresh embedding rows for the %d BPE tokens no training sequence contains", refreshed)
        if settings.reading_steps:
            examples = train_stage(model, tokenizer, data, settings.reading_stage(), READING_SEED_OFFSET, words, losses,
                                   seen)
            refreshed = refresh_unseen_rows(model, tokenizer, seen, settings.seed)
            logger.info("fresh rows again for the %d tokens no training sequence contains", refreshed)
        train_seconds = time.time() - train_start
    eval_start = time.time()
    scores = probe(model, tokenizer, data, settings, words)
    report = {
        **scores,
        "pretraining_ranks": [PRETRAIN_FIRST_RANK, PRETRAIN_FIRST_RANK + len(data.tool_slots) - settings.spare_tools - 1],
        "spare_tools": list(data.tool_slots)[len(data.tool_slots) - settings.spare_tools:],
        "num_parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "train_examples": len(examples),
        "refreshed_rows": refreshed,
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.time() - eval_start, 1),
        "build_seconds": round(time.time() - start, 1),
        "command": build_command(settings),
        "settings": dataclasses.asdict(settings),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    report["weights_sha256"] = file_sha256(output_dir / "model.safetensors")
    atomic_write_json(output_dir / REPORT_FILE, report)
    log_scores(report)
    return report


def log_scores(report: dict) -> None:
    """One log line per probe of a build report."""
    for name in ("held_out", "held_out_fresh_values", "held_out_in_context", "held_out_in_context_made_up_names"):
        if name in report:
            scores = report[name]
            logger.info("%s: tool accuracy %.3f, argument accuracy %.3f, exact match %.3f (%d samples)", name,
                        scores["tool_accuracy"], scores["argument_accuracy"], scores["exact_accuracy"],
                        scores["total_examples"])


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def is_finished_build(path: str | os.PathLike) -> bool:
    """Whether `path` holds a complete build (model, tokenizer and report)."""
    path = Path(path)
    return all((path / name).is_file() for name in FINISHED_FILES)


def ensure_backbone(
    path: str | os.PathLike = DEFAULT_BACKBONE_DIR, *, rebuild: bool = False, settings: BuildSettings | None = None
) -> Path:
    """Return `path` at once when it holds a finished build, else build it there (locked, moved into place whole)."""
    target = Path(path).expanduser().resolve()
    if not rebuild and is_finished_build(target):
        return target
    with build_lock(target):
        if not rebuild and is_finished_build(target):
            return target
        settings = settings or BuildSettings()
        logger.info("building the tiny backbone into %s (seed %d, %d steps)", target, settings.seed, settings.steps)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            build_backbone(staging, settings)
            if (target / MODEL_CARD).is_file():
                shutil.copy2(target / MODEL_CARD, staging / MODEL_CARD)
            replace_dir(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def read_report(path: str | os.PathLike) -> dict:
    """The build report of a finished backbone."""
    with open(Path(path) / REPORT_FILE, encoding="utf-8") as handle:
        return json.load(handle)


def settings_of(report: dict) -> BuildSettings:
    """The BuildSettings a report records (fields it lacks keep their defaults)."""
    known = {f.name for f in dataclasses.fields(BuildSettings)}
    recorded = dict(report.get("settings", {}))
    if recorded and "consolidation_steps" not in recorded:
        # Builds from before the reading stage: their second stage, if any, was called the reading stage and had no
        # in-context samples; builds from before that had no second stage.
        recorded["consolidation_steps"] = recorded.pop("reading_steps", 0)
        recorded["consolidation_learning_rate"] = recorded.pop("reading_learning_rate",
                                                               BuildSettings.consolidation_learning_rate)
        for name in ("reading_icl_fraction", "reading_max_length"):
            recorded.pop(name, None)
        recorded["reading_steps"] = 0
    recorded.setdefault("spare_tools", 0)
    return BuildSettings(**{key: value for key, value in recorded.items() if key in known})


def probe_build(path: str | os.PathLike) -> dict:
    """Score a finished build again with the held-out probe (as saved, float32 on CPU) and rewrite its report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    report = read_report(path)
    settings = settings_of(report)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = load_corpus(settings.corpus_seed)
    data = pretraining_samples(settings.seed, rows, settings)
    start = time.time()
    report.update(probe(model, tokenizer, data, settings, word_pool(rows)))
    report["eval_seconds"] = round(time.time() - start, 1)
    report.setdefault("command", build_command(settings))
    report["weights_sha256"] = file_sha256(path / "model.safetensors")
    atomic_write_json(path / REPORT_FILE, report)
    log_scores(report)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# CLI


# The build choices the CLI exposes (each measured in the model card's table of recipes), in the order
# `build_command` spells them, with their argparse type (or choices) and help.
CHOICE_FLAGS: dict[str, dict[str, Any]] = {
    "split": {"choices": sorted(SPLIT_PATTERNS), "help": "pre-tokenizer split"},
    "fresh_value_fraction": {"type": unit_interval, "help": "share of samples with fresh argument values"},
    "icl_fraction": {"type": unit_interval, "help": "share of samples in the in-context format"},
    "icl_alias_fraction": {"type": unit_interval, "help": "share of in-context samples under made-up tool names"},
    "icl_min_listed": {"type": positive_int, "help": "fewest tools an in-context sample lists"},
    "icl_max_listed": {"type": positive_int, "help": "most tools an in-context sample lists"},
    "spare_tools": {"type": non_negative_int, "help": "pretraining tools beyond ranks 201-400 that no corpus row calls"},
    "hidden_size": {"type": positive_int, "help": "model width"},
    "num_layers": {"type": positive_int, "help": "decoder layers"},
    "max_position_embeddings": {"type": positive_int, "help": "positions of the model"},
    "max_length": {"type": positive_int, "help": "longest training sample, in tokens"},
    "batch_tokens": {"type": positive_int, "help": "tokens per batch, padding included"},
    "consolidation_steps": {"type": non_negative_int, "help": "steps of the second stage after --steps (0: none)"},
    "reading_steps": {"type": non_negative_int, "help": "steps of the reading stage after those (0: none)"},
    "reading_icl_fraction": {"type": unit_interval, "help": "share of the reading stage's samples in the in-context format"},
    "reading_max_length": {"type": positive_int, "help": "longest sample of the reading stage, in tokens"},
    "reading_batch_tokens": {"type": positive_int, "help": "tokens per batch of the reading stage, padding included"},
    "reading_name_loss_weight": {"type": positive_float, "help": "loss weight of the reading stage's tool-name tokens"},
    "threads": {"type": non_negative_int, "help": "torch threads; the weights depend on it (0: all cores)"},
}

def build_command(settings: BuildSettings, output: str | None = None) -> str:
    """The command that rebuilds `settings`: the CLI's choices that differ from their defaults are spelled out; settings
    the CLI does not expose (vocabulary, learning rate, ...) are only in the report's "settings"."""
    defaults = BuildSettings()
    parts = ["python tiny_backbone.py --rebuild", f"--steps {settings.steps}", f"--seed {settings.seed}"]
    parts += [f"--{name} {getattr(settings, name)}" for name in CHOICE_FLAGS
              if getattr(settings, name) != getattr(defaults, name)]
    if output is not None:
        parts.append(f"--output {output}")
    return " ".join(parts)


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = CliParser(description="Build (or reuse) the embedded tiny Llama backbone pretrained for function calling.")
    parser.add_argument("--output", default=DEFAULT_MODEL_NAME, help="where to save the backbone (default: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="build again even when a finished build exists")
    parser.add_argument("--probe", action="store_true",
                        help="score the finished build at --output again with the held-out probe and rewrite its report")
    parser.add_argument("--steps", type=positive_int, default=BuildSettings.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=BuildSettings.seed, help="seed of the corpus, data and weights")
    for name, spec in CHOICE_FLAGS.items():
        parser.add_argument(f"--{name}", default=getattr(BuildSettings, name),
                            **{**spec, "help": f"{spec['help']} (default: %(default)s)"})
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if args.probe:
        if args.rebuild:
            raise UserError("--probe scores an existing build; it cannot be combined with --rebuild")
        if not is_finished_build(output):
            raise UserError(f"--output {output} holds no finished build to probe")
        report = probe_build(output)
    else:
        choices = {name: getattr(args, name) for name in CHOICE_FLAGS}
        try:
            settings = BuildSettings(seed=args.seed, steps=args.steps, **choices)
        except ValueError as error:
            raise UserError(str(error)) from None
        path = ensure_backbone(output, rebuild=args.rebuild, settings=settings)
        report = read_report(path)
        if not args.rebuild and report.get("command") != build_command(settings):
            logger.warning("%s was built by `%s`; pass --rebuild to build it with these flags", path,
                           report.get("command"))
    held_out, icl = report["held_out"], report["held_out_in_context"]
    print(
        f"{output}: held-out tool accuracy {held_out['tool_accuracy']:.3f}, exact match {held_out['exact_accuracy']:.3f} "
        f"({held_out['total_examples']} samples of its own tools); in-context tool accuracy {icl['tool_accuracy']:.3f}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
