"""The round loop and flags that main_sequential.py (TokMem) and lora_sequential.py (LoRA baseline) share.

For each round: seed, build the round's training set (a method may mix replay in), train, checkpoint the trainable
state, evaluate the planned test sets, and mark the round done in the run directory, so `--resume` continues after the
last finished round with the same numbers.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from common import CliParser, UserError, non_negative_float, positive_float, positive_int, set_seed, setup_logging
from dataset import (PROMPT_FORMATS, NativeFunctionCallingDataset, build_prompt_text, check_prompt_format,
                     curriculum_order, discover_available_tools, make_dataloader)
from experiment import (RunDirectory, RoundData, default_output_dir, load_round_data, parse_training_rounds,
                        per_round_values)
from model import LoraSettings
from training import TrainSettings, evaluate, format_demo, train_round

logger = logging.getLogger(__name__)

# make_loader(round_index, dataset, shuffle, seed) -> DataLoader; the default is dataset.make_dataloader.
LoaderFactory = Callable[[int, NativeFunctionCallingDataset, bool, int], DataLoader]


def add_common_flags(parser: CliParser) -> None:
    """Flags the TokMem and LoRA-baseline CLIs share."""
    parser.add_argument("--model_name", default=None, help="HF id or local dir (default: the embedded tiny backbone)")
    parser.add_argument("--training_rounds", required=True, help="START-END:EPOCHS,... e.g. 1-50:1,51-100:3")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--lr", type=positive_float, default=5e-3)
    parser.add_argument("--eval_after_each_round", action="store_true")
    parser.add_argument("--eval_all_previous", action="store_true", help="after each round also test earlier rounds")
    parser.add_argument("--eval_batch_size", type=positive_int, default=16)
    parser.add_argument("--max_new_tokens", type=positive_int, default=256)
    parser.add_argument("--demo", type=int, default=0, metavar="N", help="print N example predictions per evaluation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max_length", type=positive_int, default=512)
    parser.add_argument("--prompt_format", default="chat", choices=PROMPT_FORMATS,
                        help="chat: the tokenizer's chat template with a fixed date; original: the original toolkit's "
                             "hand-written Llama-3 turns (no system turn, nothing after the assistant header)")
    parser.add_argument("--max_grad_norm", type=non_negative_float, default=1.0,
                        help="clip the trainable gradients to this norm; 0 turns clipping off (the original's way)")
    parser.add_argument("--lora_r", type=positive_int, default=8)
    parser.add_argument("--lora_alpha", type=positive_int, default=32)
    parser.add_argument("--lora_dropout", type=float, default=0.1)
    parser.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--train_max_function_calls", type=positive_int, default=4)
    parser.add_argument("--train_max_function_calls_per_round", default=None, help="comma list, one per round")
    parser.add_argument("--test_max_function_calls", type=positive_int, default=4)
    parser.add_argument("--test_max_function_calls_per_round", default=None, help="comma list, one per round")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--save_checkpoints", action="store_true", help="keep every round's checkpoint (not just the last)")
    parser.add_argument("--checkpoint_dir", default=None, help="default: <output_dir>/checkpoints")
    parser.add_argument("--log_file", default=None, help="default: <output_dir>/train.log")
    parser.add_argument("--curriculum_learning", action="store_true", help="fewest calls first within a round")
    parser.add_argument("--output_dir", default=None, help="run directory (default: runs/<method>_<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output_dir after its last round")


def resolve_model_name(name: str | None) -> str:
    """The default is the embedded tiny backbone, built (once, cached) on first use."""
    if name:
        return name
    from tiny_backbone import ensure_backbone

    return str(ensure_backbone())


def parse_int_list(flag: str, text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def lora_settings_from(args) -> LoraSettings:
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora_dropout: expected a number in [0, 1), got {args.lora_dropout}")
    modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if not modules:
        raise UserError("--lora_target_modules is empty")
    return LoraSettings(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=modules,
        layer_indices=parse_int_list("--lora_layer_indices", getattr(args, "lora_layer_indices", None)),
    )


def load_rounds(args):
    """Parse the rounds and caps, then read and validate every round's files up front."""
    rounds = parse_training_rounds(args.training_rounds)
    n = len(rounds)
    train_caps = per_round_values("--train_max_function_calls_per_round", args.train_max_function_calls_per_round,
                                  args.train_max_function_calls, n)
    test_caps = per_round_values("--test_max_function_calls_per_round", args.test_max_function_calls_per_round,
                                 args.test_max_function_calls, n)
    data = [load_round_data(args.data_dir, spec, tr, te) for spec, tr, te in zip(rounds, train_caps, test_caps)]
    return rounds, data


def open_run(args, method: str) -> tuple[RunDirectory, list[RoundData], list[str]]:
    """Read every round's data, open (or resume) the run directory, start logging and seed.

    Also returns the run's global tool list (all rounds' training tools, round by round): a tool keeps its place in
    it, hence its token or marker, in every round and after --resume.
    """
    if args.resume and not args.output_dir:
        raise UserError("--resume needs --output_dir (the run to continue)")
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(method)
    rounds, data = load_rounds(args)
    run = RunDirectory(output_dir, method, args, rounds, args.resume)
    setup_logging(args.log_file or output_dir / "train.log")
    set_seed(args.seed)
    return run, data, discover_available_tools([d.train for d in data])


def evaluation_plan(round_index: int, num_rounds: int, args) -> list[int]:
    """Which rounds' test sets to score after training round `round_index`."""
    last = round_index == num_rounds - 1
    if args.eval_all_previous or last:
        return list(range(round_index + 1))
    if args.eval_after_each_round:
        return [round_index]
    return []


def run_rounds(
    args,
    model,
    data: Sequence[RoundData],
    run: RunDirectory,
    prepare_round: Callable[[int], list[dict]],
    train_lora_for: Callable[[int], bool],
    make_loader: LoaderFactory | None = None,
) -> dict:
    """The round loop both CLIs share: train, checkpoint, evaluate, record; resumable after any finished round.

    `prepare_round(i)` returns round i's training samples, `train_lora_for(i)` whether LoRA trains in round i, and
    `make_loader` (optional) builds the training loader (the LoRA baseline mixes replay into each batch there).
    """
    tokenizer = model.tokenizer
    check_prompt_format(tokenizer, args.prompt_format)
    run.record_data(data)
    run.record_prompt(build_prompt_text(tokenizer, data[0].test[0]["user_input"], prompt_format=args.prompt_format))
    if run.completed_rounds:
        model.load(run.checkpoint_path(run.completed_rounds - 1))
    for index, round_data in enumerate(data):
        if index < run.completed_rounds:
            continue
        spec = round_data.spec
        set_seed(args.seed + index)
        samples = prepare_round(index)
        if args.curriculum_learning:
            samples = curriculum_order(samples, args.seed + index)
        train_set = NativeFunctionCallingDataset(samples, tokenizer, model.encode_tool, args.max_length, "train",
                                                 prompt_format=args.prompt_format)
        shuffle = not args.curriculum_learning
        if make_loader is None:
            loader = make_dataloader(train_set, args.batch_size, tokenizer.pad_token_id, shuffle, args.seed + index)
        else:
            loader = make_loader(index, train_set, shuffle, args.seed + index)
        active = active_tool_mask(model, round_data.tools)
        settings = TrainSettings(
            epochs=spec.epochs, lr=args.lr, lora_lr=getattr(args, "lora_lr", args.lr),
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
            renorm_active_tools=(getattr(args, "renorm_active_tools", False)
                                 and index + 1 >= getattr(args, "renorm_from_round", 1)),
            renorm_rows=getattr(args, "renorm_rows", "all"),
        )
        logger.info("round %d/%d: tools %s, %d training samples, %d epoch(s)",
                    index + 1, len(data), spec.name, len(samples), spec.epochs)
        train_lora = train_lora_for(index)
        model.set_lora_trainable(train_lora)
        stats = train_round(model, loader, settings, active, train_lora, f"round {spec.name}")
        logger.info("round %s: %d steps, mean loss %.4f, final loss %.4f, tool loss %.4f",
                    spec.name, stats.steps, stats.mean_loss, stats.final_loss, stats.mean_tool_loss)
        offered = None if getattr(args, "offer_all_tools", False) else [t for d in data[: index + 1] for t in d.tools]
        model.set_generation_tools(offered)
        model.save(run.checkpoint_path(index))
        for test_index in evaluation_plan(index, len(data), args):
            evaluate_round(args, model, data[test_index], index, test_index, run)
        run.finish_round(index, {"steps": stats.steps, "mean_loss": stats.mean_loss, "final_loss": stats.final_loss,
                                 "mean_tool_loss": stats.mean_tool_loss})
        if not args.save_checkpoints and index > 0:
            remove_checkpoint(run.checkpoint_path(index - 1))
    return run.write_summary({"parameters": model.parameter_breakdown()})


def active_tool_mask(model, tools: Sequence[str]) -> torch.Tensor | None:
    """Bool mask over the bank rows of this round's tools (None for a model without a bank)."""
    if not model.bank_parameters():
        return None
    mask = torch.zeros(model.num_tools, dtype=torch.bool)
    for tool in tools:
        mask[model.tool_names.index(tool)] = True
    return mask


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)


def evaluate_round(args, model, round_data, round_index: int, test_index: int, run: RunDirectory) -> None:
    """Score one test set after one round, in the normal mode and, when asked, with the gold tools forced."""
    tokenizer = model.tokenizer
    test_set = NativeFunctionCallingDataset(round_data.test, tokenizer, model.encode_tool, args.max_length, "eval",
                                            prompt_format=args.prompt_format)
    loader = make_dataloader(test_set, args.eval_batch_size, tokenizer.pad_token_id, shuffle=False)
    modes = [("predicted", False)]
    if getattr(args, "use_ground_truth_tools", False):
        modes.append(("ground_truth_tools", True))
    for mode, forced in modes:
        label = f"after {run.rounds[round_index].name} on {round_data.spec.name}"
        metrics, predictions = evaluate(model, loader, forced, args.max_new_tokens, f"eval {label}",
                                        getattr(args, "ground_truth_style", "forced"))
        run.add_metrics(round_index, test_index, metrics, mode)
        logger.info("%s (%s): tool F1 %.3f, call F1 %.3f, exact %.3f", label, mode, metrics["avg_tool_f1_score"],
                    metrics["avg_f1_score"], metrics["exact_accuracy"])
        if args.demo:
            logger.info("examples %s:\n%s", label, format_demo(predictions, args.demo))


