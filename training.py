"""One round of training and one evaluation pass, shared by TokMem and the LoRA baseline.

A model here is anything with `forward(input_ids, attention_mask, labels) -> output with .loss and .tool_loss`,
`row_parameters()`, `lora_parameters()`, `generate_with_tool_prediction(...)` and, for ground-truth-tool mode,
`generate_with_ground_truth_tools(...)`: FunctionCallingModel and the LoRA baseline's marker model both are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import distributed
from common import UserError
from dataset import IGNORE_INDEX
from decoding import left_pad_positions
from eval import score_predictions
from model import labelled_positions

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the round stops and nothing of it is saved."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings: a run's (the defaults of its flags), and with `for_round` one round's.

    `lr` is the tool rows' rate (the LoRA baseline trains its adapter at its --lr: `lora_lr` is set to it);
    `renorm_from_round` is 1-based; `batch_size` and `curriculum_learning` shape the round's loader.
    `prototype_weight` > 0 adds the earlier tools' prototype loss (ToolMemory.prototype_loss) of
    `prototype_samples` draws to every step's loss, and has each round record its tools' prototypes.
    """

    epochs: int = 1
    lr: float = 5e-3
    lora_lr: float = 5e-4
    lora_weight_decay: float = 0.01
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    renorm_active_tools: bool = False
    renorm_rows: str = "all"
    renorm_from_round: int = 1
    batch_size: int = 8
    curriculum_learning: bool = False
    prototype_weight: float = 0.0
    prototype_samples: int = 64

    def for_round(self, index: int, epochs: int) -> TrainSettings:
        """The settings of round `index` (0-based): its epochs, and renormalisation from `renorm_from_round` on."""
        renorm = self.renorm_active_tools and index + 1 >= self.renorm_from_round
        return replace(self, epochs=epochs, renorm_active_tools=renorm)


@dataclass
class RoundStats:
    """What a round of training did."""

    steps: int
    mean_loss: float
    mean_tool_loss: float
    final_loss: float
    mean_prototype_loss: float = float("nan")


def build_optimizer(model, settings: TrainSettings, train_lora: bool) -> torch.optim.AdamW:
    """AdamW with the memory's rows (no weight decay) and, when trained, LoRA (own lr and weight decay)."""
    groups = []
    rows = [p for p in model.row_parameters() if p.requires_grad]
    if rows:
        groups.append({"params": rows, "lr": settings.lr, "weight_decay": 0.0})
    lora = model.lora_parameters() if train_lora else []
    if lora:
        groups.append({"params": lora, "lr": settings.lora_lr, "weight_decay": settings.lora_weight_decay})
    if not groups:
        raise UserError("nothing to train: the model has no trainable tool rows or LoRA parameters")
    return torch.optim.AdamW(groups)


def _restore_inactive_rows(model, active: torch.Tensor, snapshots: Sequence[torch.Tensor]) -> None:
    """Put back the rows of tools outside the round, bit for bit."""
    with torch.no_grad():
        for rows, snapshot in zip(model.row_parameters(), snapshots):
            rows[~active] = snapshot


RENORM_ROWS = ("all", "output")


def _renormalize_active_rows(model, active: torch.Tensor, rows: str = "all") -> None:
    """Scale the active rows to the mean norm of the inactive ones (nothing to match when every row is active).

    `rows`: `all` renormalises every row tensor (input and output rows when decoupled), `output` only the rows that
    score tools (the input rows when coupled), as the original does.
    """
    if active.all():
        return
    tensors = model.row_parameters() if rows == "all" else [model.memory.output_rows]
    with torch.no_grad():
        for tensor in tensors:
            target = tensor[~active].norm(dim=-1).mean()
            picked = tensor[active]
            tensor[active] = picked / picked.norm(dim=-1, keepdim=True).clamp(min=1e-12) * target


# on_step(point): called after every optimizer step with its curve point (see curve_point)
StepCallback = Callable[[dict], None]


def curve_point(step: int, epoch: int, losses: Sequence[float], prototype_losses: Sequence[float], weight: float,
                lr: float, grad_norm: float) -> dict:
    """One optimizer step of the training curve: its batches' mean data loss, mean prototype loss (None when off),
    the loss they make together, the learning rate of the first parameter group and the gradient norm (before
    clipping, over the trainable parameters after the other tools' rows are masked)."""
    data = sum(losses) / len(losses)
    prototype = sum(prototype_losses) / len(prototype_losses) if prototype_losses else None
    return {"step": step, "epoch": epoch, "loss": data + weight * (prototype or 0.0), "data_loss": data,
            "prototype_loss": prototype, "lr": lr, "grad_norm": grad_norm}


def _optimizer_step(model, optimizer, scheduler, settings: TrainSettings, active_tools: torch.Tensor | None,
                    snapshots: Sequence[torch.Tensor]) -> float:
    """One optimizer step on the accumulated gradients: summed over the processes, the other tools' rows masked,
    clipped (unless --max_grad_norm 0), applied; the other rows restored and the round's renormalised. Returns the
    gradient norm before clipping."""
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in trainable if p.grad is not None]
    if distributed.is_distributed():
        distributed.all_reduce_(grads)
    if active_tools is not None:
        for rows in model.row_parameters():
            if rows.grad is not None:
                rows.grad[~active_tools] = 0
    if settings.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if active_tools is not None:
        _restore_inactive_rows(model, active_tools, snapshots)
        if settings.renorm_active_tools:
            _renormalize_active_rows(model, active_tools, settings.renorm_rows)
    return float(norm)


class _PrototypeTerm:
    """The prototype loss of one round: the (old, learned) tool masks and the generator of its draws."""

    def __init__(self, masks: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings):
        self.old_tools, self.learned = masks
        self.weight = settings.prototype_weight
        self.samples = settings.prototype_samples
        # Seeded by the round's seed (set_seed before the round), the same on every process: each process adds the
        # same draws at 1/world_size weight, so any number of processes trains as one does.
        self.generator = torch.Generator().manual_seed(torch.initial_seed())

    @classmethod
    def for_round(cls, model, active_tools: torch.Tensor | None, settings: TrainSettings) -> "_PrototypeTerm | None":
        """The round's term, or None where the weight is 0 or no earlier tool has a prototype."""
        masks = _prototype_masks(model, active_tools) if settings.prototype_weight else None
        return cls(masks, settings) if masks is not None else None

    def add(self, model, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`loss` plus the weighted prototype loss (this process's share), and the unweighted loss's value."""
        prototype_loss = model.memory.prototype_loss(self.old_tools, self.learned, self.samples, self.generator)
        return loss + self.weight * prototype_loss / distributed.world_size(), prototype_loss.item()


def _batch_loss(model, batch: dict, several: bool) -> tuple[torch.Tensor, float, float]:
    """A training batch's forward: its loss (normalised over the global batch with several processes), the loss's
    value and the tool-position loss's value."""
    labels = batch["labels"].to(model.device)
    out = model(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device), labels=labels)
    # Only the losses are needed from here on: the output goes out of scope here, which frees its labelled rows'
    # logits (a vocabulary-sized tensor that backward does not use) before backward runs.
    if several:
        return _global_batch_loss(out, labels, batch.get("dummy", False))
    tool_value = out.tool_loss.item() if out.tool_loss is not None else float("nan")
    return out.loss, out.loss.item(), tool_value


def _inactive_snapshots(model, active_tools: torch.Tensor | None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """`active_tools` on the rows' device, and a copy of every other tool's rows (restored after each step)."""
    if active_tools is None:
        return None, []
    active_tools = active_tools.to(model.row_parameters()[0].device)
    return active_tools, [rows.detach()[~active_tools].clone() for rows in model.row_parameters()]


def _round_stats(steps: int, losses: Sequence[float], tool_losses: Sequence[float],
                 prototype_losses: Sequence[float], description: str) -> RoundStats:
    """The round's RoundStats from its per-batch losses; an empty round is the training set's fault."""
    if not losses:
        raise UserError(f"{description}: the training set is empty")
    return RoundStats(steps=steps, mean_loss=sum(losses) / len(losses), mean_tool_loss=_nanmean(tool_losses),
                      final_loss=sum(losses[-10:]) / len(losses[-10:]),
                      mean_prototype_loss=_nanmean(prototype_losses))


def train_round(
    model,
    loader: DataLoader,
    settings: TrainSettings,
    active_tools: torch.Tensor | None = None,
    train_lora: bool = False,
    description: str = "train",
    on_step: StepCallback | None = None,
) -> RoundStats:
    """Train one round: only the memory's rows of the `active_tools` (a bool mask over tools) change; `on_step`
    gets each optimizer step's `curve_point`.

    A NaN or infinite loss raises TrainingDiverged before the optimizer applies it.
    """
    optimizer = build_optimizer(model, settings, train_lora)
    accumulation = settings.gradient_accumulation_steps
    # An epoch ends with a flush of its last, possibly partial, group: that is one optimizer step too.
    total_steps = max(1, math.ceil(len(loader) / accumulation) * settings.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    active_tools, snapshots = _inactive_snapshots(model, active_tools)
    prototypes = _PrototypeTerm.for_round(model, active_tools, settings)
    model.train()
    losses: list[float] = []
    tool_losses: list[float] = []
    prototype_losses: list[float] = []
    step = 0
    several = distributed.is_distributed()
    with tqdm(total=total_steps, desc=description, leave=False, dynamic_ncols=True,
              disable=not distributed.is_main()) as progress:
        for epoch in range(settings.epochs):
            for batch_index, batch in enumerate(loader):
                loss, loss_value, tool_value = _batch_loss(model, batch, several)
                step_value = loss_value
                if prototypes is not None:
                    loss, prototype_value = prototypes.add(model, loss)
                    prototype_losses.append(prototype_value)
                    step_value += settings.prototype_weight * prototype_value
                if not math.isfinite(step_value):
                    raise TrainingDiverged(
                        f"{description}: the loss became {step_value} at epoch {epoch + 1}, batch {batch_index + 1}; "
                        "this round is not saved (try a lower --lr / --lora_lr)")
                group = accumulation_group_size(batch_index, len(loader), accumulation)
                (loss / group).backward()
                losses.append(loss_value)
                tool_losses.append(tool_value)
                if (batch_index + 1) % accumulation and batch_index + 1 != len(loader):
                    continue
                lr = optimizer.param_groups[0]["lr"]
                grad_norm = _optimizer_step(model, optimizer, scheduler, settings, active_tools, snapshots)
                if on_step is not None:
                    on_step(curve_point(step + 1, epoch + 1, losses[-group:], prototype_losses[-group:],
                                        settings.prototype_weight, lr, grad_norm))
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return _round_stats(step, losses, tool_losses, prototype_losses, description)


def _prototype_masks(model, active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(old, learned) tool masks for the prototype loss: earlier tools with a recorded prototype, and those with
    this round's; None where no earlier tool has one (the first round, or a model without a memory)."""
    if active is None:
        return None
    memory = model.memory
    active = active.to(memory.prototype_count.device)
    old = memory.has_prototype() & ~active
    return (old, old | active) if old.any() else None


@torch.no_grad()
def record_prototypes(model, loader: DataLoader, tools: torch.Tensor) -> int:
    """Record the query prototypes of `tools` (a bool mask) in the model's memory: the mean and per-dimension
    deviation of the last hidden states that predict each tool's token over `loader`'s batches (one pass, no
    gradient; with several processes, over every process's share). Returns how many states went in."""
    memory = model.memory
    num_tools, hidden_size = memory.prototype_mean.shape
    device = memory.prototype_mean.device
    sums = torch.zeros(num_tools, hidden_size, dtype=torch.float64, device=device)
    squares = torch.zeros_like(sums)
    counts = torch.zeros(num_tools, dtype=torch.long, device=device)
    model.eval()
    for batch in loader:
        input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        labels = batch["labels"].to(model.device)
        hidden = model.training_hidden(input_ids, attention_mask, left_pad_positions(attention_mask))
        if batch.get("dummy", False):  # run for the collectives of a sharded backbone, counted nowhere
            continue
        rows, positions = labelled_positions(labels)
        slots = memory.token_to_slot[labels[rows, positions + 1]]
        keep = slots >= 0
        states = hidden[rows[keep], positions[keep]].double()
        sums.index_add_(0, slots[keep], states)
        squares.index_add_(0, slots[keep], states.square())
        counts.index_add_(0, slots[keep], torch.ones_like(slots[keep]))
    distributed.reshard(model)
    distributed.all_reduce_([sums, squares, counts])
    memory.set_prototypes(sums, squares, counts, tools)
    return int(counts[tools.to(device)].sum())


def _global_batch_loss(out, labels: torch.Tensor, dummy: bool) -> tuple[torch.Tensor, float, float]:
    """This process's share of the global batch's loss, and the global loss and tool loss (several processes).

    The returned tensor is the share's summed token losses over the GLOBAL count of labelled tokens, so the summed
    gradients of all processes are those of the global batch's mean loss; a dummy share (an empty slice of the last
    batch) weighs zero. A non-finite loss anywhere makes the global loss NaN on every process, so all stop together.
    """
    count = 0 if dummy else int((labels[:, 1:] != IGNORE_INDEX).sum())
    tool_count = 0 if dummy or out.num_tool_targets is None else int(out.num_tool_targets)
    local_loss = out.loss.item()
    loss_sum = local_loss * count if count else 0.0
    tool_sum = out.tool_loss.item() * tool_count if tool_count else 0.0
    total, total_count, total_tool, total_tool_count, bad = distributed.sum_values(
        [loss_sum, count, tool_sum, tool_count, 0.0 if math.isfinite(local_loss) else 1.0])
    if bad:
        return out.loss, float("nan"), float("nan")
    loss_value = total / total_count if total_count else 0.0
    tool_value = total_tool / total_tool_count if total_tool_count else 0.0
    return out.loss * (count / total_count if total_count else 0.0), loss_value, tool_value


def accumulation_group_size(batch_index: int, num_batches: int, accumulation: int) -> int:
    """How many batches share the optimizer step of `batch_index`: `accumulation`, fewer in an epoch's last group."""
    group_start = batch_index - batch_index % accumulation
    return min(accumulation, num_batches - group_start)


def _nanmean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


@torch.no_grad()
def predict(
    model, loader: DataLoader, use_ground_truth_tools: bool = False, max_new_tokens: int = 256, description: str = "eval",
    ground_truth_style: str = "forced",
) -> list[dict]:
    """Generate for every sample of an eval loader; returns the prediction dicts that eval.score_predictions takes.

    With several processes each decodes its share of the loader's batches (distributed.work_share: whole batches, so
    every sample is decoded in the batch one process would put it in) and every process gets all the predictions, in
    the loader's order.
    """
    model.eval()
    batches = list(loader)
    per_batch: list[list[dict]] = []
    shares = distributed.work_share(len(batches))
    for index in tqdm(shares, desc=description, leave=False, dynamic_ncols=True, disable=not distributed.is_main()):
        batch = batches[0 if index is None else index]
        if use_ground_truth_tools:
            outputs = model.generate_with_ground_truth_tools(
                batch["input_ids"], batch["attention_mask"], batch["gold_tools"], max_new_tokens=max_new_tokens,
                style=ground_truth_style,
            )
        else:
            outputs = model.generate_with_tool_prediction(
                batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens
            )
        if index is None:
            continue
        per_batch.append([
            {
                "user_input": query,
                "predicted_tools": out.predicted_tools,
                "function_calls": out.function_calls,
                "gold_tools": tools,
                "gold_calls": calls,
                "generated_text": out.text,
                **({"untooled_text": out.untooled_text} if out.untooled_text else {}),
            }
            for out, query, tools, calls in zip(outputs, batch["user_input"], batch["gold_tools"], batch["gold_calls"])
        ])
    return [prediction for chunk in distributed.gather_in_order(per_batch, len(batches)) for prediction in chunk]


def evaluate(
    model, loader: DataLoader, use_ground_truth_tools: bool = False, max_new_tokens: int = 256, description: str = "eval",
    ground_truth_style: str = "forced",
) -> tuple[dict, list[dict]]:
    """Generate and score a test loader: (metric dict of eval.score_predictions, predictions)."""
    predictions = predict(model, loader, use_ground_truth_tools, max_new_tokens, description, ground_truth_style)
    return score_predictions(predictions), predictions


@torch.no_grad()
def mean_loss(model, batches: Iterable[dict]) -> float:
    """The data loss over labelled batches (training mode), weighted by their labelled tokens, without gradient."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"].to(model.device)
        out = model(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device), labels=labels)
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += out.loss.item() * tokens
        count += tokens
    return total / count if count else float("nan")


def format_demo(predictions: Sequence[dict], count: int = 3) -> str:
    """A few examples: query, gold calls and predicted calls."""
    lines = []
    for prediction in list(predictions)[:count]:
        lines.append(f"query:     {prediction['user_input']}")
        gold = ", ".join(f"{t} {c}" for t, c in zip(prediction["gold_tools"], prediction["gold_calls"]))
        pred = ", ".join(f"{t} {c}" for t, c in zip(prediction["predicted_tools"], prediction["function_calls"]))
        lines.append(f"gold:      {gold}")
        lines.append(f"predicted: {pred or '(none)'}")
        lines.append("")
    return "\n".join(lines)
