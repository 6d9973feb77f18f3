"""Prompt and label construction, the function-calling dataset, left-padding collate, and dataloaders.

One function builds the prompt for a query (`build_prompt_ids`) and one builds the answer (`build_answer_ids`); training
and evaluation use the same two, for TokMem (a tool is its reserved token) and for the LoRA baseline (a tool is a
plain-text marker), so the two methods see identical prompts.
"""

from __future__ import annotations

import json
import logging
import random
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


def build_prompt_ids(tokenizer, user_input: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-template prompt: [system turn], the user turn, then the assistant header."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_input})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        bos = tokenizer.bos_token or ""
        text = bos + text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
