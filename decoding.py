"""The one greedy decoder of the toolkit, and the score processors TokMem decodes with.

`greedy_decode` is batched, left-padded and KV-cached; a `step` function runs the model (TokMem's forward, or any
causal LM through `causal_lm_step`) and `ScoreProcessor`s edit each step's scores (offered tools, call boundaries,
gold-tool forcing) and see the chosen ids. TokMem, the LoRA baseline, the ICL/RAG baseline and the tiny backbone's
report all decode here. It is this loop rather than transformers' `generate` because the processors need the JSON
state of every row between steps, and the bench measured the loop (decode_speedup, batched + cache vs one by one).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import distributed
from common import UserError

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, object]]
"""(input ids, attention mask, position ids, cache or None) -> (float32 next-token scores, batch x vocab; cache)."""


class ScoreProcessor:
    """A hook on every decoding step: `__call__` edits the next-token scores, `observe` sees the ids chosen."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def observe(self, next_ids: list[int]) -> None:
        """Called once per step with every row's chosen id (a finished row's is its filler stop id)."""


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token, counting on (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_decode(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  stop_ids: Sequence[int], processors: Sequence[ScoreProcessor] = ()) -> list[list[int]]:
    """Greedy continuations of a left-padded batch; each row's new ids up to and including its first stop id.

    A finished row is fed its first stop id until every row has stopped or `max_new_tokens` are made; with a sharded
    backbone, until every process's rows have stopped (distributed.all_finished), so all run the same steps.
    """
    batch = input_ids.shape[0]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    generated = []
    positions = left_pad_positions(attention_mask)
    scores, cache = step(input_ids, attention_mask, positions, None)
    position = positions[:, -1:]
    for _ in range(max_new_tokens):
        for processor in processors:
            scores = processor(scores)
        next_ids = scores.argmax(dim=-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, stop_ids[0]), next_ids)
        chosen = next_ids.tolist()
        for processor in processors:
            processor.observe(chosen)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, stops)
        if distributed.all_finished(bool(finished.all())):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = position + 1
        scores, cache = step(next_ids.unsqueeze(1), attention_mask, position, cache)
    if not generated:
        return [[] for _ in range(batch)]
    return [_cut_at_stop(row, set(stop_ids)) for row in torch.stack(generated, dim=1).tolist()]


def _cut_at_stop(row: list[int], stops: set[int]) -> list[int]:
    end = next((i for i, token in enumerate(row) if token in stops), None)
    return row if end is None else row[: end + 1]


def causal_lm_step(model) -> Step:
    """The step of a transformers causal LM (LoRA layers included when peft wrapped it): last-position logits."""

    def step(input_ids, attention_mask, position_ids, cache):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values

    return step


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token-id prompts, left-padded to the longest."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def decode_prompts(step: Step, prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int, max_new_tokens: int,
                   stop_ids: Sequence[int], device: torch.device | str = "cpu",
                   progress: Callable[[Sequence], Sequence] = lambda chunks: chunks) -> list[list[int]]:
    """`greedy_decode` over many prompts, in batches of similar length; results in the prompts' order. With several
    processes each decodes its share of the batches (distributed.work_share) and every process gets every result."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[first:first + batch_size] for first in range(0, len(order), batch_size)]
    decoded: list[list[list[int]]] = []
    for share in progress(distributed.work_share(len(chunks))):
        chunk = chunks[0 if share is None else share]
        input_ids, mask = left_pad([prompts[i] for i in chunk], pad_id)
        rows = greedy_decode(step, input_ids.to(device), mask.to(device), max_new_tokens, stop_ids)
        if share is not None:
            decoded.append(rows)
    outputs: list[list[int]] = [[] for _ in prompts]
    for chunk, rows in zip(chunks, distributed.gather_in_order(decoded, len(chunks))):
        for index, row in zip(chunk, rows):
            outputs[index] = row
    return outputs


class OfferedTools(ScoreProcessor):
    """Tool tokens outside the offered tools are never emitted (a sequential run offers the tools learned so far)."""

    def __init__(self, blocked_ids: torch.Tensor):
        self.blocked_ids = blocked_ids

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """-inf in every blocked tool column, in place (one index_fill_ over all of them)."""
        return scores.index_fill_(1, self.blocked_ids, float("-inf"))


GROUND_TRUTH_STYLES = ("forced", "replace")


class ToolForcingProcessor(ScoreProcessor):
    """Ground-truth-tool decoding: the gold tools take the tool positions in order, batched.

    `forced` (this toolkit): a tool position is the first answer step and any step where the model would emit a tool
    token or end the turn at a call boundary; while gold tools remain the next one is forced there, once all are used
    the turn is ended. `replace` (the original): only a tool token the model emits itself is replaced by the next gold
    tool. Either way a tool is never forced inside an unfinished call: `tracker` says where a call boundary is.
    """

    def __init__(self, gold_token_ids: list[list[int]], tool_token_ids: torch.Tensor, end_id: int,
                 tracker: CallBoundaryTracker, style: str = "forced"):
        if style not in GROUND_TRUTH_STYLES:
            raise UserError(f"--ground_truth_style: expected one of {', '.join(GROUND_TRUTH_STYLES)}, got {style!r}")
        device = tool_token_ids.device
        max_gold = max(1, max(len(g) for g in gold_token_ids))
        self.gold = torch.full((len(gold_token_ids), max_gold), end_id, dtype=torch.long, device=device)
        for i, gold in enumerate(gold_token_ids):
            self.gold[i, : len(gold)] = torch.tensor(gold, dtype=torch.long, device=device)
        self.num_gold = torch.tensor([len(g) for g in gold_token_ids], device=device)
        self.used = torch.zeros_like(self.num_gold)
        self.tool_token_ids = tool_token_ids
        self.end_id = end_id
        self.tracker = tracker
        self.style = style
        self.first_step = True

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        choice = scores.argmax(dim=-1)
        emits_tool = torch.isin(choice, self.tool_token_ids)
        remaining = self.used < self.num_gold
        if self.style == "replace":
            at_tool = emits_tool & remaining
        else:
            at_tool = emits_tool | (choice == self.end_id)
            if self.first_step:
                at_tool = torch.ones_like(at_tool)
        self.first_step = False
        at_tool &= torch.tensor(self.tracker.allowed(), device=scores.device)
        next_gold = self.gold.gather(1, self.used.clamp(max=self.gold.shape[1] - 1).unsqueeze(1)).squeeze(1)
        forced = torch.where(remaining, next_gold, torch.full_like(next_gold, self.end_id))
        forced_scores = torch.full_like(scores, float("-inf"))
        forced_scores.scatter_(1, forced.unsqueeze(1), 0.0)
        self.used = self.used + (at_tool & remaining).long()
        return torch.where(at_tool.unsqueeze(1), forced_scores, scores)


class CallBoundaryTracker(ScoreProcessor):
    """Where a tool token may come next in a batch of answers: before the first call, or once a call's JSON closed.

    The answer grammar is `[tool][JSON object][tool][JSON object]...`; a tool token inside an unfinished object is
    malformed (a weak backbone is least sure exactly there, at argument values). The tracker follows each row's
    brace depth outside JSON strings from the characters of the generated tokens (it needs only `{`, `}`, `"` and
    backslash). With `enforce`, a tool token is -inf in every row inside an unfinished call; the tracker always
    follows the chosen ids, since gold-tool forcing asks it too.
    """

    JSON_CHARS = frozenset('{}"\\')

    def __init__(self, pieces: dict[int, str], tool_token_ids: torch.Tensor, batch: int, enforce: bool = False):
        self.pieces = pieces
        self.tool_token_ids = tool_token_ids
        self.tool_ids = set(tool_token_ids.tolist())
        self.enforce = enforce
        self.seen_tool = [False] * batch
        self.opened = [False] * batch
        self.depth = [0] * batch
        self.in_string = [False] * batch
        self.escaped = [False] * batch

    @staticmethod
    def json_pieces(tokenizer) -> dict[int, str]:
        """Token id -> token text, for the tokens whose text holds a JSON brace, quote or backslash."""
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return {i: t for i, t in enumerate(tokens) if t and not CallBoundaryTracker.JSON_CHARS.isdisjoint(t)}

    def allowed(self) -> list[bool]:
        """Per row: may the next token be a tool token?"""
        return [not seen or (opened and depth == 0 and not in_string)
                for seen, opened, depth, in_string in zip(self.seen_tool, self.opened, self.depth, self.in_string)]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.enforce:
            inside_call = ~torch.tensor(self.allowed(), device=scores.device)
            scores[inside_call.nonzero(as_tuple=True)[0].unsqueeze(1), self.tool_token_ids] = float("-inf")
        return scores

    def observe(self, next_ids: list[int]) -> None:
        self.update(next_ids)

    def update(self, next_ids: Sequence[int]) -> None:
        """Follow each row's call state over its next id."""
        for row, token in enumerate(next_ids):
            if token in self.tool_ids:
                self.seen_tool[row], self.opened[row], self.depth[row] = True, False, 0
                self.in_string[row] = self.escaped[row] = False
                continue
            for char in self.pieces.get(token, ""):
                if self.in_string[row]:
                    if self.escaped[row]:
                        self.escaped[row] = False
                    elif char == "\\":
                        self.escaped[row] = True
                    elif char == '"':
                        self.in_string[row] = False
                elif char == '"':
                    self.in_string[row] = True
                elif char == "{":
                    self.opened[row] = True
                    self.depth[row] += 1
                elif char == "}":
                    self.depth[row] = max(0, self.depth[row] - 1)
