"""The round loop and flags that main_sequential.py (TokMem) and lora_sequential.py (LoRA baseline) share.

For each round: seed, build the round's training set (a method may mix replay in), train, checkpoint the trainable
state, evaluate the planned test sets, and mark the round done in the run directory, so `--resume` continues after the
last finished round with the same numbers.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from common import (CliParser, UserError, check_writable, non_negative_float, non_negative_int, positive_float,
                    positive_int, read_json, set_seed, setup_logging)
from dataset import (PROMPT_FORMATS, NativeFunctionCallingDataset, build_prompt_text, check_prompt_format,
                     curriculum_order, discover_available_tools, encode_sample, make_dataloader)
from experiment import (DEFAULT_RUNS_ROOT, RoundData, RoundSpec, RunDirectory, claim_default_run_dir, load_round_data,
                        parse_training_rounds, per_round_values, refuse_existing_run)
from model import LoraSettings, model_positions, resolve_device, resolve_dtype
from training import TrainSettings, evaluate, format_demo, train_round

logger = logging.getLogger(__name__)

# make_loader(round_index, dataset, shuffle, seed) -> DataLoader; the default is dataset.make_dataloader.
LoaderFactory = Callable[[int, NativeFunctionCallingDataset, bool, int], DataLoader]


def add_common_flags(parser: CliParser) -> None:
    """Flags the TokMem and LoRA-baseline CLIs share."""
    parser.add_argument("--model_name", default=None,
                        help="HF id or local model directory (default: the embedded tiny backbone, built on first use)")
    parser.add_argument("--training_rounds", required=True,
                        help="rounds as START-END:EPOCHS, comma-separated, e.g. 1-50:1,51-100:3 (tool ranks, "
                             "1-based inclusive; at most 100 epochs); required, no default")
    parser.add_argument("--data_dir", default="data", help="where the per-round training/, test/ and descriptions are")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="training samples per batch")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                        help="batches per optimizer step")
    parser.add_argument("--lr", type=positive_float, default=5e-3,
                        help="learning rate: of the tool rows (TokMem) or of the adapter (LoRA baseline); "
                             "run_n_rounds_main.sh uses 1e-2, run_n_rounds_lora.sh 3e-3 on the tiny backbone")
    parser.add_argument("--eval_after_each_round", action="store_true",
                        help="score each round's own test set after it (the last round is always scored; "
                             "the scripts turn this on)")
    parser.add_argument("--eval_all_previous", action="store_true",
                        help="after each round also score every earlier round's test set, for the forgetting matrix "
                             "(the scripts turn this on)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=16, help="test samples per generation batch")
    parser.add_argument("--max_new_tokens", type=positive_int, default=256, help="most tokens generated per answer")
    parser.add_argument("--demo", type=non_negative_int, default=0, metavar="N",
                        help="log N example predictions per evaluation (the scripts use 2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="backbone dtype; auto is bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max_length", type=positive_int, default=512,
                        help="most tokens of prompt + answer; a longer query loses its head, never the answer "
                             "(at most the model's positions)")
    parser.add_argument("--prompt_format", default="chat", choices=PROMPT_FORMATS,
                        help="chat: the tokenizer's chat template with a fixed date; original: the original toolkit's "
                             "hand-written Llama-3 turns (no system turn, nothing after the assistant header)")
    parser.add_argument("--max_grad_norm", type=non_negative_float, default=1.0,
                        help="clip the trainable gradients to this norm; 0 turns clipping off (the original's way)")
    parser.add_argument("--lora_r", type=positive_int, default=8, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=positive_int, default=32, help="LoRA scaling numerator (alpha / r)")
    parser.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input, in [0, 1)")
    parser.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj",
                        help="comma list of module names to adapt (run_n_rounds_lora.sh adds gate_proj,up_proj,"
                             "down_proj on the tiny backbone)")
    parser.add_argument("--train_max_function_calls", type=positive_int, default=4,
                        help="the k of the training files' _{k}calls names (the scripts use 3)")
    parser.add_argument("--train_max_function_calls_per_round", default=None,
                        help="one k per round, comma-separated, instead of --train_max_function_calls "
                             "(default: that value for every round)")
    parser.add_argument("--test_max_function_calls", type=positive_int, default=4,
                        help="the k of the test files' _{k}calls names (the scripts use 3)")
    parser.add_argument("--test_max_function_calls_per_round", default=None,
                        help="one k per round, comma-separated, instead of --test_max_function_calls "
                             "(default: that value for every round)")
    parser.add_argument("--seed", type=int, default=42, help="seed of initialisation, shuffling and dropout")
    parser.add_argument("--save_checkpoints", action="store_true",
                        help="keep every round's checkpoint (by default only the last finished round's)")
    parser.add_argument("--checkpoint_dir", default=None,
                        help="where checkpoints go (default: <output_dir>/checkpoints)")
    parser.add_argument("--log_file", default=None, help="the log (default: <output_dir>/train.log)")
    parser.add_argument("--curriculum_learning", action="store_true",
                        help="within a round, train on samples with fewer calls first")
    parser.add_argument("--output_dir", default=None,
                        help="run directory (default: runs/<method>_<timestamp>, a new one per run)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir after its last finished round (same configuration)")


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


@dataclass
class RunPlan:
    """A run as checked before anything is written: its rounds and data, the global tool list (all rounds' training
    tools, round by round: a tool keeps its place, hence its token or marker, in every round and after --resume),
    the model and its positions, and with --resume the run to continue."""

    method: str
    rounds: list[RoundSpec]
    data: list[RoundData]
    tool_names: list[str]
    model_name: str
    positions: int | None
    resumed: RunDirectory | None
    started: float = field(default_factory=time.time)


def check_output_flags(args) -> None:
    """--output_dir, --log_file and --checkpoint_dir can be written, and a new run does not overwrite an old one."""
    if args.resume and not args.output_dir:
        raise UserError("--resume needs --output_dir (the run to continue)")
    if args.output_dir:
        check_writable(args.output_dir, "--output_dir")
        if not args.resume:
            refuse_existing_run(Path(args.output_dir))
    else:
        check_writable(DEFAULT_RUNS_ROOT, "--output_dir (default: runs/<method>_<timestamp>)")
    if args.log_file:
        check_writable(args.log_file, "--log_file", "file")
    if args.checkpoint_dir:
        check_writable(args.checkpoint_dir, "--checkpoint_dir")


def prepare_run(args, method: str) -> RunPlan:
    """Check what can be checked before the model is built, and write nothing: the output places, every round's
    data, the model directory and --max_length against its positions, the device, and with --resume the run to
    continue. `args.device` and `args.dtype` become what `auto` resolves to, so the config (and --resume) records
    what ran. Seeds the run. Logs go to stderr until the run directory exists (building the default backbone
    reports its progress there)."""
    setup_logging()
    check_output_flags(args)
    rounds, data = load_rounds(args)
    model_name = resolve_model_name(args.model_name)
    positions = model_positions(model_name)
    if positions and args.max_length > positions:
        raise UserError(f"--max_length {args.max_length} is beyond the {positions} positions of --model_name "
                        f"{model_name}; use at most {positions}")
    device = resolve_device(args.device)
    args.device, args.dtype = str(device), str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    resumed = RunDirectory(Path(args.output_dir), method, args, rounds, resume=True) if args.resume else None
    set_seed(args.seed)
    tool_names = discover_available_tools([d.train for d in data])
    return RunPlan(method, rounds, data, tool_names, model_name, positions, resumed)


def check_lengths(args, model, plan: RunPlan) -> None:
    """Every round keeps a training sample within --max_length (answers are never cut, so a sample whose answer
    fills it is left out), and its longest test prompt plus --max_new_tokens fits the model's positions."""
    def encoded(sample: dict, mode: str) -> dict | None:
        return encode_sample(sample, model.tokenizer, model.encode_tool, args.max_length, mode,
                             prompt_format=args.prompt_format)

    for round_data in plan.data:
        name = round_data.spec.name
        if not any(encoded(sample, "train") for sample in round_data.train):
            raise UserError(f"round {name}: the answer of every one of its {len(round_data.train)} training samples "
                            f"fills --max_length {args.max_length}; raise --max_length")
        if plan.positions:
            longest = max(len(encoded(sample, "eval")["input_ids"]) for sample in round_data.test)
            if longest + args.max_new_tokens > plan.positions:
                raise UserError(f"round {name}: a test prompt of {longest} tokens plus --max_new_tokens "
                                f"{args.max_new_tokens} passes the model's {plan.positions} positions; lower "
                                "--max_new_tokens or --max_length")


def start_run(args, plan: RunPlan, model) -> RunDirectory:
    """Once the model is built: check the lengths, then create the run directory (the default name exclusively) or
    continue the resumed one, and start logging into it. config.json records each round's data provenance and the
    exact prompt of the first test sample; a resumed run whose prompt would differ is refused before anything is
    written."""
    check_prompt_format(model.tokenizer, args.prompt_format)
    prompt = build_prompt_text(model.tokenizer, plan.data[0].test[0]["user_input"], prompt_format=args.prompt_format)
    if plan.resumed is not None:
        plan.resumed.check_prompt(prompt)
    check_lengths(args, model, plan)
    run = plan.resumed
    if run is None:
        output_dir = Path(args.output_dir) if args.output_dir else claim_default_run_dir(plan.method)
        run = RunDirectory(output_dir, plan.method, args, plan.rounds, resume=False)
    run.record_data(plan.data)
    run.record_prompt(prompt)
    run.started = plan.started
    setup_logging(args.log_file or run.path / "train.log")
    if run.completed_rounds:
        logger.info("resuming %s after %d finished round(s)", run.path, run.completed_rounds)
    return run


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
    if run.completed_rounds == len(data) and (run.path / "summary.json").is_file():
        logger.info("%s already finished its %d round(s); nothing to train", run.path, len(data))
        return read_json(run.path / "summary.json", "run summary")
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
    """Bool mask over the memory's rows: this round's tools (None for a model without rows)."""
    if not model.row_parameters():
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


