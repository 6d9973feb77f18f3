"""The round loop that main_sequential.py (TokMem) and lora_sequential.py (LoRA baseline) share.

For each round: seed, build the round's training set (a method may mix replay in), train, checkpoint the trainable
state, evaluate the planned test sets, and mark the round done in the run directory, so `--resume` continues after the
last finished round with the same numbers.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import distributed
from common import UserError, atomic_write_with, check_writable, read_json, set_seed
from dataset import (NativeFunctionCallingDataset, build_prompt_text, check_prompt_format, curriculum_order,
                     encode_sample, left_pad_collate, make_dataloader)
from experiment import (DEFAULT_RUNS_ROOT, RoundData, RoundSpec, RunDirectory, claim_default_run_dir,
                        hold_out_validation, load_round_data, load_single_split, parse_training_rounds,
                        per_round_values, refuse_existing_run)
from model import model_positions, resolve_device, resolve_dtype
from settings import DataSettings, EvalSettings, OutputSettings, RunSettings, resolve_model_name
from training import evaluate, format_demo, mean_loss, record_prototypes, train_round

logger = logging.getLogger(__name__)

# make_loader(round_index, dataset, shuffle, seed) -> DataLoader; the default is dataset.make_dataloader.
LoaderFactory = Callable[[int, NativeFunctionCallingDataset, bool, int], DataLoader]


def load_rounds(data: DataSettings) -> tuple[list[RoundSpec], list[RoundData]]:
    """Parse the rounds and caps, then read and validate every round's files up front; without --training_rounds,
    the single split's one round (experiment.load_single_split)."""
    if data.training_rounds is None:
        single = load_single_split(data.train_data, data.test_data, data.epochs)
        return [single.spec], [single]
    if data.train_data or data.test_data:
        raise UserError("--train_data/--test_data (one split) and --training_rounds (per-round files) exclude each "
                        "other; give one of them")
    rounds = parse_training_rounds(data.training_rounds)
    n = len(rounds)
    train_caps = per_round_values("--train_max_function_calls_per_round", data.train_max_function_calls_per_round,
                                  data.train_max_function_calls, n)
    test_caps = per_round_values("--test_max_function_calls_per_round", data.test_max_function_calls_per_round,
                                 data.test_max_function_calls, n)
    loaded = [load_round_data(data.data_dir, spec, tr, te) for spec, tr, te in zip(rounds, train_caps, test_caps)]
    return rounds, loaded


@dataclass
class RunPlan:
    """A run as checked before anything is written: its settings (device and dtype resolved), rounds and data, the
    global tool list (all rounds' training tools, round by round: a tool keeps its place, hence its token or marker,
    in every round and after --resume), the model and its positions, and with --resume the run to continue."""

    method: str
    settings: RunSettings
    rounds: list[RoundSpec]
    data: list[RoundData]
    tool_names: list[str]
    model_name: str
    positions: int | None
    resumed: RunDirectory | None
    started: float = field(default_factory=time.time)


def check_output_flags(output: OutputSettings) -> None:
    """--output_dir, --log_file and --checkpoint_dir can be written, and a new run does not overwrite an old one."""
    if output.resume and not output.output_dir:
        raise UserError("--resume needs --output_dir (the run to continue)")
    if output.output_dir:
        check_writable(output.output_dir, "--output_dir")
        if not output.resume:
            refuse_existing_run(Path(output.output_dir))
    else:
        check_writable(DEFAULT_RUNS_ROOT, "--output_dir (default: runs/<method>_<timestamp>)")
    if output.log_file:
        check_writable(output.log_file, "--log_file", "file")
    if output.checkpoint_dir:
        check_writable(output.checkpoint_dir, "--checkpoint_dir")
    if output.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError("--report_to tensorboard needs the tensorboard package: pip install -r "
                            "requirements-optional.txt (or pip install tensorboard)") from None


def resolve_model_settings(settings: RunSettings) -> RunSettings:
    """The settings with `auto` device and dtype resolved, in the model settings and in the recorded flags, so the
    config (and --resume) records what ran. Under torchrun this joins the job (distributed.init_from_env): the
    process's device is cuda:LOCAL_RANK on CUDA, and the flags record process 0's."""
    device = distributed.init_from_env(resolve_device(settings.model.device))
    dtype = str(resolve_dtype(settings.model.dtype, device)).removeprefix("torch.")
    model = replace(settings.model, device=str(device), dtype=dtype)
    flags = {**settings.flags, "device": distributed.recorded_device(device), "dtype": model.dtype}
    return replace(settings, model=model, flags=flags)


def prepare_run(settings: RunSettings, method: str) -> RunPlan:
    """Check what can be checked before the model is built, and write nothing: the output places, every round's
    data, the model directory and --max_length against its positions, the device, and with --resume the run to
    continue. The plan's settings have device and dtype resolved. Seeds the run. Logs go to stderr until the run
    directory exists (building the default backbone reports its progress there). Under torchrun every process
    checks the same and joins the job here, before the model is built."""
    distributed.setup_process_logging()
    check_output_flags(settings.output)
    rounds, data = load_rounds(settings.data)
    model_name = resolve_model_name(settings.model.model_name)
    positions = model_positions(model_name)
    max_length = settings.data.max_length
    if positions and max_length > positions:
        raise UserError(f"--max_length {max_length} is beyond the {positions} positions of --model_name "
                        f"{model_name}; use at most {positions}")
    if settings.data.query_cut == "none":
        settings = replace(settings, data=replace(settings.data, max_length=positions or sys.maxsize))
    if settings.rng == "original" and distributed.env_world_size() > 1:
        raise UserError("--rng original draws every random number in one process's program order, so it cannot "
                        "run under several processes (WORLD_SIZE > 1); use --rng toolkit")
    settings = resolve_model_settings(settings)
    resumed = None
    if settings.output.resume:
        resumed = RunDirectory(Path(settings.output.output_dir), method, settings.flags, rounds, resume=True,
                               checkpoint_dir=settings.output.checkpoint_dir)
    set_seed(settings.seed)
    tool_names = list(dict.fromkeys(t for d in data for t in d.tools))  # round by round, in each round's order
    share = settings.data.validation_split
    data = [hold_out_validation(d, share, settings.seed, index) for index, d in enumerate(data)]
    return RunPlan(method, settings, rounds, data, tool_names, model_name, positions, resumed)


def check_lengths(model, plan: RunPlan) -> None:
    """Every round keeps a training sample within --max_length (answers are never cut, so a sample whose answer
    fills it is left out), and its longest test prompt plus --max_new_tokens fits the model's positions."""
    data, max_new_tokens = plan.settings.data, plan.settings.model.max_new_tokens

    def encoded(sample: dict, mode: str) -> dict | None:
        return encode_sample(sample, model.tokenizer, model.encode_tool, data.max_length, mode,
                             prompt_format=data.prompt_format)

    for round_data in plan.data:
        name = round_data.spec.name
        if not any(encoded(sample, "train") for sample in round_data.train):
            raise UserError(f"round {name}: the answer of every one of its {len(round_data.train)} training samples "
                            f"fills --max_length {data.max_length}; raise --max_length")
        if plan.positions:
            longest = max(len(encoded(sample, "eval")["input_ids"]) for sample in round_data.test)
            if longest + max_new_tokens > plan.positions:
                raise UserError(f"round {name}: a test prompt of {longest} tokens plus --max_new_tokens "
                                f"{max_new_tokens} passes the model's {plan.positions} positions; lower "
                                "--max_new_tokens or --max_length")


def start_run(plan: RunPlan, model) -> RunDirectory:
    """Once the model is built: check the lengths, then create the run directory (the default name exclusively) or
    continue the resumed one, and start logging into it. config.json records each round's data provenance and the
    exact prompt of the first test sample; a resumed run whose prompt would differ is refused before anything is
    written."""
    settings = plan.settings
    prompt_format = settings.data.prompt_format
    check_prompt_format(model.tokenizer, prompt_format)
    prompt = build_prompt_text(model.tokenizer, plan.data[0].test[0]["user_input"], prompt_format=prompt_format)
    if plan.resumed is not None:
        plan.resumed.check_prompt(prompt)
    check_lengths(model, plan)
    if settings.model.shard_backbone:
        distributed.shard_backbone(model.causal_lm)
    run = plan.resumed
    if run is None:
        output_dir = settings.output.output_dir
        path = Path(output_dir) if output_dir else distributed.from_main(lambda: claim_default_run_dir(plan.method))
        run = RunDirectory(path, plan.method, settings.flags, plan.rounds, resume=False,
                           checkpoint_dir=settings.output.checkpoint_dir)
    run.record_inputs(plan.data, prompt, plan.model_name)
    run.report_to(settings.output.report_to)
    run.started = plan.started
    distributed.setup_process_logging(settings.output.log_file or run.path / "train.log")
    if run.completed_rounds:
        logger.info("resuming %s after %d finished round(s)", run.path, run.completed_rounds)
    return run


def evaluation_plan(round_index: int, num_rounds: int, evaluation: EvalSettings) -> list[int]:
    """Which rounds' test sets to score after training round `round_index`."""
    last = round_index == num_rounds - 1
    if evaluation.eval_all_previous or last:
        return list(range(round_index + 1))
    if evaluation.eval_after_each_round:
        return [round_index]
    return []


def round_loader(settings: RunSettings, model, samples: list[dict], index: int,
                 make_loader: LoaderFactory | None) -> DataLoader:
    """Round `index`'s training loader: its samples (fewer calls first with --curriculum_learning, else shuffled),
    seeded by the round (with --rng original, shuffled from torch's global generator at each epoch, as the original's
    DataLoader is); with several processes, each one's share of every global batch (distributed.share_batches)."""
    seed = settings.seed + index
    if settings.train.curriculum_learning:
        samples = curriculum_order(samples, seed)
    train_set = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, settings.data.max_length,
                                             "train", prompt_format=settings.data.prompt_format)
    shuffle = not settings.train.curriculum_learning
    if make_loader is None:
        loader = make_dataloader(train_set, settings.train.batch_size, model.tokenizer.pad_token_id, shuffle,
                                 None if settings.rng == "original" else seed)
    else:
        loader = make_loader(index, train_set, shuffle, seed)
    return distributed.share_batches(loader)


def run_rounds(
    settings: RunSettings,
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
    if run.completed_rounds == len(data) and (run.path / "summary.json").is_file():
        logger.info("%s already finished its %d round(s); nothing to train", run.path, len(data))
        return read_json(run.path / "summary.json", "run summary")
    original_rng = settings.rng == "original"
    if run.completed_rounds:
        model.load(run.checkpoint_path(run.completed_rounds - 1))
        if original_rng:
            load_rng_state(run.checkpoint_path(run.completed_rounds - 1))
    for index, round_data in enumerate(data):
        if index < run.completed_rounds:
            continue
        spec = round_data.spec
        if not original_rng:  # the original seeds once, before the model is built (prepare_run)
            set_seed(settings.seed + index)
        samples = prepare_round(index)
        loader = round_loader(settings, model, samples, index, make_loader)
        active = active_tool_mask(model, round_data.tools)
        logger.info("round %d/%d: tools %s, %d training samples, %d epoch(s)",
                    index + 1, len(data), spec.name, len(samples), spec.epochs)
        train_lora = train_lora_for(index)
        model.set_lora_trainable(train_lora)
        stats = train_round(model, loader, settings.train.for_round(index, spec.epochs), active, train_lora,
                            f"round {spec.name}", on_step=lambda point, i=index: run.log_step(i, point))
        logger.info("round %s: %d steps, mean loss %.4f, final loss %.4f, tool loss %.4f%s",
                    spec.name, stats.steps, stats.mean_loss, stats.final_loss, stats.mean_tool_loss,
                    "" if math.isnan(stats.mean_prototype_loss) else f", prototype loss {stats.mean_prototype_loss:.4f}")
        if settings.train.prototype_weight and active is not None:
            states = record_prototypes(model, loader, active)
            logger.info("round %s: query prototypes of its tools from %d hidden states", spec.name, states)
        offered = None if settings.decoding.offer_all_tools else [t for d in data[: index + 1] for t in d.tools]
        model.set_generation_tools(offered)
        if run.writer:
            model.save(run.checkpoint_path(index))
        for test_index in evaluation_plan(index, len(data), settings.evaluation):
            evaluate_round(settings, model, data[test_index], index, test_index, run)
            if data[test_index].validation:
                evaluate_validation(settings, model, data[test_index], index, test_index, run)
        if original_rng and run.writer:  # after evaluation: each test loader's iterator draws a seed, as the original's
            save_rng_state(run.checkpoint_path(index))
        record = {"steps": stats.steps, "mean_loss": stats.mean_loss, "final_loss": stats.final_loss,
                  "mean_tool_loss": stats.mean_tool_loss}
        if not math.isnan(stats.mean_prototype_loss):
            record["mean_prototype_loss"] = stats.mean_prototype_loss
        run.finish_round(index, record)
        if not settings.output.save_checkpoints and index > 0 and run.writer:
            remove_checkpoint(run.checkpoint_path(index - 1))
    return run.write_summary({"parameters": model.parameter_breakdown()})


RNG_STATE_FILE = "rng_state.safetensors"


def save_rng_state(checkpoint: Path) -> None:
    """Write torch's global generator states (CPU, and CUDA's when present) beside a checkpoint: with --rng original
    the next round's draws continue from there, so a run resumed after this round draws what an unbroken one does."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    atomic_write_with(checkpoint / RNG_STATE_FILE, lambda tmp: save_file(states, tmp))


def load_rng_state(checkpoint: Path) -> None:
    """Restore the generator states `save_rng_state` wrote; a checkpoint without them cannot resume exactly."""
    path = checkpoint / RNG_STATE_FILE
    if not path.is_file():
        raise UserError(f"--rng original: {path} is missing, so the run cannot continue its random draws where it "
                        "stopped; start the run again")
    states = load_file(str(path))
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in states]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


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


def evaluate_round(settings: RunSettings, model, round_data: RoundData, round_index: int, test_index: int,
                   run: RunDirectory) -> None:
    """Score one test set after one round, in the normal mode and, when asked, with the gold tools forced."""
    tokenizer = model.tokenizer
    test_set = NativeFunctionCallingDataset(round_data.test, tokenizer, model.encode_tool, settings.data.max_length,
                                            "eval", prompt_format=settings.data.prompt_format)
    loader = make_dataloader(test_set, settings.evaluation.eval_batch_size, tokenizer.pad_token_id, shuffle=False)
    decoding = settings.decoding
    modes = [("predicted", False)] + ([("ground_truth_tools", True)] if decoding.use_ground_truth_tools else [])
    for mode, forced in modes:
        label = f"after {run.rounds[round_index].name} on {round_data.spec.name}"
        metrics, predictions = evaluate(model, loader, forced, settings.model.max_new_tokens, f"eval {label}",
                                        decoding.ground_truth_style)
        run.add_metrics(round_index, test_index, metrics, mode,
                        run.write_predictions(round_index, test_index, mode, predictions))
        logger.info("%s (%s): tool F1 %.3f, call F1 %.3f, exact %.3f", label, mode, metrics["avg_tool_f1_score"],
                    metrics["avg_f1_score"], metrics["exact_accuracy"])
        if settings.evaluation.demo:
            logger.info("examples %s:\n%s", label, format_demo(predictions, settings.evaluation.demo))


def evaluate_validation(settings: RunSettings, model, round_data: RoundData, round_index: int, test_index: int,
                        run: RunDirectory) -> None:
    """Score one round's held-out training samples after one round, and their loss; in fixed batches, drawing
    nothing from any generator (a DataLoader's iterator would, and --rng original counts every draw)."""
    data = settings.data

    def batches(mode: str, size: int) -> list[dict]:
        items = NativeFunctionCallingDataset(round_data.validation, model.tokenizer, model.encode_tool,
                                             data.max_length, mode, prompt_format=data.prompt_format).items
        return [left_pad_collate(items[i:i + size], model.tokenizer.pad_token_id) for i in range(0, len(items), size)]

    label = f"after {run.rounds[round_index].name} on {round_data.spec.name}'s validation samples"
    metrics, predictions = evaluate(model, batches("eval", settings.evaluation.eval_batch_size), False,
                                    settings.model.max_new_tokens, f"eval {label}")
    loss = mean_loss(model, batches("train", settings.train.batch_size))
    run.add_metrics(round_index, test_index, metrics, "validation",
                    run.write_predictions(round_index, test_index, "validation", predictions), loss)
    logger.info("%s: loss %.4f, tool F1 %.3f, call F1 %.3f, exact %.3f", label, loss, metrics["avg_tool_f1_score"],
                metrics["avg_f1_score"], metrics["exact_accuracy"])
