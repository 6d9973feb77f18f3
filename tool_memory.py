"""ToolMemory: the trainable rows of TokMem, one per tool token, as their own module (as peft keeps an adapter).

A tool's input row replaces its token's embedding; its output row gives its logit (`hidden . row`). The two are the
same rows unless decoupled. The module owns the rows, their initialisation, the input lookup, the tool logits and
their state; FunctionCallingModel composes it with the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import UserError

MEMORY_DTYPES = ("float32", "model")
TOOL_INIT_NORMS = ("embedding", "unit")
INPUT_ROWS_KEY = "input_rows"
OUTPUT_ROWS_KEY = "output_rows"
PROTOTYPE_KEYS = ("prototype_mean", "prototype_std", "prototype_count")


class ToolMemory(nn.Module):
    """The rows of `len(tool_token_ids)` tools over a vocabulary of `vocab_size`, width `hidden`.

    `row_dtype` is float32 (the optimizer's precision; cast to the backbone's dtype where used) or the backbone's
    dtype (`--memory_dtype model`, as the original keeps them). `decoupled` adds separate output rows.
    """

    def __init__(self, tool_token_ids: list[int], vocab_size: int, hidden: int, device: torch.device,
                 row_dtype: torch.dtype, decoupled: bool = False):
        super().__init__()
        num_tools = len(tool_token_ids)
        self.register_buffer("tool_token_ids", torch.tensor(tool_token_ids, dtype=torch.long, device=device))
        slot = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        slot[self.tool_token_ids] = torch.arange(num_tools, device=device)
        self.register_buffer("token_to_slot", slot)
        self.input_rows = nn.Parameter(torch.zeros(num_tools, hidden, device=device, dtype=row_dtype))
        self.decoupled_output_rows = (
            nn.Parameter(torch.zeros(num_tools, hidden, device=device, dtype=row_dtype)) if decoupled else None
        )
        # Each learned tool's query prototype (see `set_prototypes`); a count of 0 means none was recorded.
        self.register_buffer("prototype_mean", torch.zeros(num_tools, hidden, device=device))
        self.register_buffer("prototype_std", torch.zeros(num_tools, hidden, device=device))
        self.register_buffer("prototype_count", torch.zeros(num_tools, dtype=torch.long, device=device))

    @property
    def decoupled(self) -> bool:
        return self.decoupled_output_rows is not None

    @property
    def output_rows(self) -> torch.Tensor:
        """The rows that score tools: the decoupled output rows, else the input rows."""
        return self.decoupled_output_rows if self.decoupled else self.input_rows

    def rows(self) -> list[nn.Parameter]:
        """Every row tensor: the input rows, and the output rows when decoupled."""
        return [p for p in (self.input_rows, self.decoupled_output_rows) if p is not None]

    def is_tool(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask: which of `token_ids` are tool tokens."""
        return self.token_to_slot[token_ids] >= 0

    @torch.no_grad()
    def initialize(self, input_reference: torch.Tensor, output_reference: torch.Tensor, seed: int | None = 0,
                   norm: str = "embedding", drawn_rows: int | None = None) -> None:
        """Orthogonal rows, scaled to the mean row norm of `input_reference` (the backbone's embeddings; input rows)
        and `output_reference` (its LM head; output rows) with `norm="embedding"`, or left at unit norm with
        `norm="unit"` (the original's initialisation).

        `seed` None draws from torch's global generator on the rows' device, as the original does (`--rng
        original`): one orthogonal matrix of `drawn_rows` rows per row tensor, of which the first are kept as they
        come (orthonormal, not re-normalised). A seed draws from its own generator and leaves the global one alone.
        """
        if norm not in TOOL_INIT_NORMS:
            raise UserError(f"--tool_init_norm: expected one of {', '.join(TOOL_INIT_NORMS)}, got {norm!r}")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        targets = [(self.input_rows, input_reference)]
        if self.decoupled:
            targets.append((self.decoupled_output_rows, output_reference))
        for rows, reference in targets:
            count = max(drawn_rows or 0, rows.shape[0])
            fresh = torch.empty((count, rows.shape[1]), dtype=torch.float32,
                                device=rows.device if generator is None else "cpu")
            nn.init.orthogonal_(fresh, generator=generator)
            fresh = fresh[: rows.shape[0]]
            if generator is not None:
                fresh = F.normalize(fresh, dim=-1)
            if norm == "embedding":
                fresh = fresh * reference.float().norm(dim=-1).mean().item()
            rows.copy_(fresh.to(device=rows.device, dtype=rows.dtype))

    def embed(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The backbone's `embeddings` of `input_ids` with every tool token's vector replaced by its input row."""
        slot = self.token_to_slot[input_ids]
        rows = self.input_rows[slot.clamp(min=0)].to(embeddings.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, embeddings)

    def tool_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden . row` for every tool (one float32 matmul over all tools), shaped `hidden.shape[:-1] + (tools,)`."""
        return hidden.float() @ self.output_rows.float().t()

    def tool_logits_into(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Overwrite the tool columns of float32 `logits` in place with the tool logits of `hidden`; returns them."""
        return logits.index_copy_(-1, self.tool_token_ids, self.tool_logits(hidden))

    # --- query prototypes ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_prototypes(self, sums: torch.Tensor, squares: torch.Tensor, counts: torch.Tensor,
                       tools: torch.Tensor) -> None:
        """Record the query prototypes of `tools` (a bool mask) from per-tool sums, sums of squares and counts of
        the hidden states that predicted them: their mean and per-dimension standard deviation."""
        counts = counts.to(self.prototype_count.device)
        tools = tools.to(counts.device) & (counts > 0)
        n = counts[tools].unsqueeze(-1).double()
        mean = sums.to(counts.device)[tools].double() / n
        variance = (squares.to(counts.device)[tools].double() / n - mean.square()).clamp(min=0)
        self.prototype_mean[tools] = mean.to(self.prototype_mean.dtype)
        self.prototype_std[tools] = variance.sqrt().to(self.prototype_std.dtype)
        self.prototype_count[tools] = counts[tools]

    def has_prototype(self) -> torch.Tensor:
        """Bool mask over tools: which have a recorded query prototype."""
        return self.prototype_count > 0

    def prototype_loss(self, old: torch.Tensor, learned: torch.Tensor, samples: int,
                       generator: torch.Generator) -> torch.Tensor | None:
        """Cross-entropy, over the `learned` tools' logits, of `samples` draws from the prototypes of the `old`
        tools (bool masks), each toward its own tool; None where no old tool has a prototype.

        A draw is the prototype's mean plus Gaussian noise of its per-dimension deviation (prototype augmentation,
        Zhu et al., CVPR 2021). The loss reaches only the rows that are trained, so it keeps new rows from taking
        the old tools' queries without any old query being stored.
        """
        tools = (old.to(self.prototype_count.device) & self.has_prototype()).nonzero().squeeze(-1)
        if not len(tools):
            return None
        picks = torch.randint(len(tools), (samples,), generator=generator).to(tools.device)
        targets = tools[picks]
        noise = torch.randn((samples, self.prototype_mean.shape[-1]), generator=generator).to(tools.device)
        draws = self.prototype_mean[targets] + self.prototype_std[targets] * noise
        logits = self.tool_logits(draws).masked_fill(~learned.to(tools.device), float("-inf"))
        return F.cross_entropy(logits, targets)

    # --- state -------------------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The rows as float32 CPU tensors, under the checkpoint's keys (`input_rows`, `output_rows`), and the query
        prototypes where any is recorded."""
        state = {INPUT_ROWS_KEY: self.input_rows.detach().float().cpu().contiguous()}
        if self.decoupled:
            state[OUTPUT_ROWS_KEY] = self.decoupled_output_rows.detach().float().cpu().contiguous()
        if self.has_prototype().any():
            state.update({key: getattr(self, key).cpu().contiguous() for key in PROTOTYPE_KEYS})
        return state

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor a checkpoint of this memory may hold, by key."""
        shapes = {INPUT_ROWS_KEY: tuple(self.input_rows.shape)}
        if self.decoupled:
            shapes[OUTPUT_ROWS_KEY] = tuple(self.decoupled_output_rows.shape)
        shapes.update({key: tuple(getattr(self, key).shape) for key in PROTOTYPE_KEYS})
        return shapes

    def required_keys(self) -> set[str]:
        """The keys every checkpoint of this memory holds (the prototypes only once recorded)."""
        return {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY} if self.decoupled else {INPUT_ROWS_KEY}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy rows saved by `trainable_state` into this memory (same tools, same shapes)."""
        self.input_rows.copy_(state[INPUT_ROWS_KEY].to(self.input_rows.device, self.input_rows.dtype))
        if self.decoupled:
            self.decoupled_output_rows.copy_(state[OUTPUT_ROWS_KEY].to(self.input_rows.device, self.input_rows.dtype))
        for key in PROTOTYPE_KEYS:  # a checkpoint without prototypes (none recorded, or written before they were)
            buffer = getattr(self, key)
            if key in state:
                buffer.copy_(state[key].to(buffer.device))
            else:
                buffer.zero_()
