"""Prompt and label construction, the function-calling dataset, left-padding collate, and dataloaders.

One function builds the prompt for a query (`build_prompt_ids`) and one builds the answer (`build_answer_ids`); training
and evaluation use the same two, for TokMem (a tool is its reserved token) and for the LoRA baseline (a tool is a
plain-text marker), so the two methods see identical prompts.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from common import UserError, read_json

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SAMPLE_FIELDS = ("user_input", "tools", "function_calls")

# A tool encoder turns a tool name into the token ids that stand for it in the answer.
ToolEncoder = Callable[[str], list[int]]


def end_of_turn_id(tokenizer) -> int:
    """The token that closes the assistant turn: Llama-3's <|eot_id|>, else the tokenizer's EOS."""
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot is not None and eot >= 0:
        return eot
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has neither <|eot_id|> nor an EOS token to end the answer with")
    return tokenizer.eos_token_id


# The chat-template path fixes the date that Llama-3.x templates write into the system block ("Today Date: ..."),
# so a prompt never depends on the calendar: a run resumed or evaluated another day sees the same tokens. This is the
# value those templates fall back to when no clock is available.
CHAT_DATE_STRING = "26 Jul 2024"
PROMPT_FORMATS = ("chat", "original")
# The original toolkit's hand-written Llama-3 turns: no system turn, no date, nothing after the assistant header.
ORIGINAL_PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n{query}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>")
ORIGINAL_PROMPT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def check_prompt_format(tokenizer, prompt_format: str) -> None:
    """`original` needs the Llama-3 header tokens; an unknown format or a tokenizer without them is a UserError."""
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"--prompt_format: expected one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "original":
        vocab = tokenizer.get_vocab()
        missing = [t for t in ORIGINAL_PROMPT_TOKENS if t not in vocab]
        if missing:
            raise UserError(f"--prompt_format original needs a Llama-3 tokenizer; this one lacks {', '.join(missing)}")


def build_prompt_text(tokenizer, user_input: str, system_prompt: str | None = None, prompt_format: str = "chat",
                      history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt as text: the chat template (fixed date) or the original's hand-written turns.

    `history`: earlier (user, assistant) exchanges written as turns of the same template between the system turn and
    the query (the in-context baselines' solved examples).
    """
    if prompt_format == "original":
        if system_prompt or history:
            raise UserError("--prompt_format original has no system turn or earlier turns; use the chat format for "
                            "tool lists and examples")
        return ORIGINAL_PROMPT.format(query=user_input)
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user_input})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             date_string=CHAT_DATE_STRING)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return (tokenizer.bos_token or "") + text


def build_prompt_ids(tokenizer, user_input: str, system_prompt: str | None = None,
                     prompt_format: str = "chat", history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Token ids of the prompt: [system turn], [earlier exchanges], the user turn, then the assistant header."""
    return tokenizer(build_prompt_text(tokenizer, user_input, system_prompt, prompt_format, history),
                     add_special_tokens=False)["input_ids"]


def build_answer_ids(
    tokenizer, tools: Sequence[str], function_calls: Sequence[str], encode_tool: ToolEncoder
) -> list[int]:
    """Token ids of the answer: [tool][arguments JSON] for each call, then the end-of-turn token."""
    ids: list[int] = []
    for tool, call in zip(tools, function_calls, strict=True):
        ids.extend(encode_tool(tool))
        ids.extend(tokenizer(call, add_special_tokens=False)["input_ids"])
    ids.append(end_of_turn_id(tokenizer))
    return ids


def tool_system_prompt(tool_descriptions: Iterable[dict]) -> str:
    """System prompt of the in-context baselines: the offered tools as JSON, and the answer format."""
    listing = "\n".join(json.dumps(desc, ensure_ascii=False, separators=(",", ":")) for desc in tool_descriptions)
    return (
        "You can call these tools:\n"
        f"{listing}\n"
        'Answer with one JSON object per call, one per line: {"name": tool name, "arguments": {...}}.'
    )


def icl_answer_text(tools: Sequence[str], function_calls: Sequence[str]) -> str:
    """The in-context answer for gold calls: one {"name", "arguments"} object per line."""
    lines = []
    for tool, call in zip(tools, function_calls, strict=True):
        lines.append(json.dumps({"name": tool, "arguments": json.loads(call)}, ensure_ascii=False))
    return "\n".join(lines)


def load_samples(path: str | Path, allowed_tools: Iterable[str] | None = None) -> list[dict]:
    """Read and validate a per-round data file; any bad row is a UserError naming the file, row and field."""
    data = read_json(path, "data file")
    if not isinstance(data, list):
        raise UserError(f"data file {path}: expected a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise UserError(f"data file {path} holds no samples")
    allowed = set(allowed_tools) if allowed_tools is not None else None
    for index, row in enumerate(data):
        validate_sample(row, f"data file {path}, row {index}", allowed)
    return data


def validate_sample(row: object, where: str, allowed_tools: set[str] | None = None) -> None:
    """Check one sample's fields, types, lengths, argument JSON and (optionally) that its tools are allowed."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with {', '.join(SAMPLE_FIELDS)}")
    for name in SAMPLE_FIELDS:
        if name not in row:
            raise UserError(f"{where}: missing field {name!r}")
    if not isinstance(row["user_input"], str) or not row["user_input"].strip():
        raise UserError(f"{where}: 'user_input' must be a non-empty string")
    tools, calls = row["tools"], row["function_calls"]
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools) or not tools:
        raise UserError(f"{where}: 'tools' must be a non-empty list of tool names")
    if not isinstance(calls, list) or not all(isinstance(c, str) for c in calls):
        raise UserError(f"{where}: 'function_calls' must be a list of JSON strings")
    if len(tools) != len(calls):
        raise UserError(f"{where}: {len(tools)} tools but {len(calls)} function_calls (they must pair up)")
    for call in calls:
        try:
            parsed = json.loads(call)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UserError(f"{where}: function call {call[:60]!r} is not a JSON object of arguments")
    if allowed_tools is not None:
        unknown = [t for t in tools if t not in allowed_tools]
        if unknown:
            raise UserError(f"{where}: tool {unknown[0]!r} is not one of this round's tools")


def discover_available_tools(sample_lists: Iterable[Sequence[dict]]) -> list[str]:
    """All tool names in order: round by round, sorted within a round, each name once."""
    names: list[str] = []
    seen: set[str] = set()
    for samples in sample_lists:
        for name in sorted({t for s in samples for t in s["tools"]}):
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def fit_prompt_ids(build: Callable[[str], list[int]], user_input: str, room: int) -> tuple[list[int], bool] | None:
    """`build(query)`'s prompt ids within `room` tokens and whether the query was cut: a prompt over its room keeps
    its template whole and loses the head of the query, at a word boundary (as little as fits); None when not even
    the query's last word fits."""
    prompt = build(user_input)
    if len(prompt) <= room:
        return prompt, False
    starts = [match.start() for match in re.finditer(r"\S+", user_input)]
    low, high, best = 1, len(starts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        ids = build(user_input[starts[middle]:])
        if len(ids) <= room:
            best, high = ids, middle - 1
        else:
            low = middle + 1
    return None if best is None else (best, True)


def encode_sample(sample: dict, tokenizer, encode_tool: ToolEncoder, max_length: int, mode: str,
                  system_prompt: str | None = None, prompt_format: str = "chat") -> dict | None:
    """One sample's ids within `max_length`. Train mode: prompt + answer, labels on the answer only; the answer is
    never cut, the query is (`fit_prompt_ids`), and a sample whose answer leaves no room for its prompt is refused
    (None). Eval mode: the prompt alone, its query cut the same way (its end kept if even the template is over)."""
    def build(text: str) -> list[int]:
        return build_prompt_ids(tokenizer, text, system_prompt, prompt_format)

    item = {"gold_tools": list(sample["tools"]), "gold_calls": list(sample["function_calls"]),
            "user_input": sample["user_input"]}
    if mode == "eval":
        fitted = fit_prompt_ids(build, sample["user_input"], max_length)
        if fitted is None:
            fitted = (build(sample["user_input"])[-max_length:], True)
        item.update(input_ids=fitted[0], labels=None, truncated=fitted[1])
        return item
    answer = build_answer_ids(tokenizer, sample["tools"], sample["function_calls"], encode_tool)
    fitted = fit_prompt_ids(build, sample["user_input"], max_length - len(answer))
    if fitted is None:
        return None
    prompt, cut = fitted
    item.update(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer, truncated=cut)
    return item


class NativeFunctionCallingDataset(Dataset):
    """Tokenized samples (`encode_sample`). Train mode: prompt + answer, labels on the answer only. Eval mode: the
    prompt alone. Samples over --max_length are counted in the log: queries cut, training samples refused."""

    def __init__(
        self,
        samples: Sequence[dict],
        tokenizer,
        encode_tool: ToolEncoder,
        max_length: int = 512,
        mode: str = "train",
        system_prompt: str | None = None,
        prompt_format: str = "chat",
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.mode = mode
        encoded = [encode_sample(s, tokenizer, encode_tool, max_length, mode, system_prompt,
                                 prompt_format) for s in samples]
        self.samples = [sample for sample, item in zip(samples, encoded) if item is not None]
        self.items = [item for item in encoded if item is not None]
        cut = sum(item["truncated"] for item in self.items)
        if cut:
            logger.warning("%d of %d samples are longer than --max_length %d: the head of their query was cut, "
                           "the answer kept", cut, len(encoded), max_length)
        refused = len(encoded) - len(self.items)
        if refused:
            logger.warning("%d of %d training samples left out: their answer alone fills --max_length %d",
                           refused, len(encoded), max_length)
        if encoded and not self.items:
            raise UserError(f"every one of the {len(encoded)} training samples has an answer longer than "
                            f"--max_length {max_length}; raise --max_length")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def left_pad_collate(batch: Sequence[dict], pad_token_id: int) -> dict:
    """Left-pad a batch to its longest row: input_ids, attention_mask, labels (when present) and the raw fields."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    has_labels = batch[0]["labels"] is not None
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, width - n:] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, width - n:] = 1
        if has_labels:
            labels[row, width - n:] = torch.tensor(item["labels"], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in ("gold_tools", "gold_calls", "user_input"):
        out[key] = [item[key] for item in batch]
    return out


def curriculum_order(samples: Sequence[dict], seed: int) -> list[dict]:
    """Fewest calls first; seeded shuffle within each call count."""
    shuffled = list(samples)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled, key=lambda s: len(s["tools"]))


def make_dataloader(
    dataset: NativeFunctionCallingDataset, batch_size: int, pad_token_id: int, shuffle: bool, seed: int | None = 0
) -> DataLoader:
    """A DataLoader with left-padding collate; shuffling is seeded so runs repeat exactly. Seed None shuffles from
    torch's global generator at the start of every epoch (the original's DataLoader)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        collate_fn=lambda batch: left_pad_collate(batch, pad_token_id),
    )
