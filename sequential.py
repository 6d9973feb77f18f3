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
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import distributed
from common import (UserError, WriteFailed, atomic_write_with, check_writable, read_json, read_safetensors, set_seed,
                    write_failure)
from dataset import (NativeFunctionCallingDataset, build_prompt_text, check_prompt_format, curriculum_order,
                     encode_sample, left_pad_collate, make_dataloader)
from experiment import (DEFAULT_RUNS_ROOT, RoundData, RoundSpec, RunDirectory, RunLock, backbone_fingerprint,
                        claim_default_run_dir, data_fingerprint, descriptions_file, hold_out_validation,
                        load_round_data, load_single_split, parse_training_rounds, per_round_values,
                        refuse_existing_run, single_split_paths, test_file, train_file)
from gguf_backbone import source_record
from model import check_backbone, model_positions, resolve_device, resolve_dtype
from settings import DataSettings, EvalSettings, OutputSettings, RunSettings, resolve_model_name
from training import evaluate, format_demo, mean_loss, record_prototypes, train_round

logger = logging.getLogger(__name__)

# make_loader(round_index, dataset, shuffle, seed) -> DataLoader; the default is dataset.make_dataloader.
LoaderFactory = Callable[[int, NativeFunctionCallingDataset, bool, int], DataLoader]


def round_caps(data: DataSettings, rounds: Sequence[RoundSpec]) -> tuple[list[int], list[int]]:
    """Each round's train and test call caps (the k of its files' names)."""
    n = len(rounds)
    return (per_round_values("--train_max_function_calls_per_round", data.train_max_function_calls_per_round,
                             data.train_max_function_calls, n),
            per_round_values("--test_max_function_calls_per_round", data.test_max_function_calls_per_round,
                             data.test_max_function_calls, n))


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
    train_caps, test_caps = round_caps(data, rounds)
    loaded = [load_round_data(data.data_dir, spec, tr, te) for spec, tr, te in zip(rounds, train_caps, test_caps)]
    return rounds, loaded


def data_paths(data: DataSettings, rounds: Sequence[RoundSpec]) -> list[Path]:
    """Every file the rounds read: train, test and (where present) descriptions, round by round (the single split:
    its two files)."""
    if data.training_rounds is None:
        return list(single_split_paths(data.train_data, data.test_data))
    paths = []
    for spec, train_calls, test_calls in zip(rounds, *round_caps(data, rounds)):
        paths += [train_file(data.data_dir, spec, train_calls), test_file(data.data_dir, spec, test_calls),
                  descriptions_file(data.data_dir, spec)]
    return paths


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
    inputs: dict = field(default_factory=dict)  # fingerprints of the data files and backbone (config.json "inputs")
    lock: RunLock = field(default_factory=RunLock)  # held on the run directory until the run ends (`with plan.lock`)
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


def check_before_data(settings: RunSettings) -> tuple[RunSettings, list[RoundSpec], str, int | None]:
    """What needs no data file, checked first and writing nothing: the output places, the rounds, the model
    directory and --max_length against its positions, the backbone (LoRA's target modules and layers), --rng and
    the device. Returns the settings with device and
    dtype resolved, the rounds, the model name and its positions. Under torchrun this joins the job."""
    check_output_flags(settings.output)
    single_split = settings.data.training_rounds is None  # its one round is known once its files are read
    rounds = [] if single_split else parse_training_rounds(settings.data.training_rounds)
    round_caps(settings.data, rounds)
    model_name = resolve_model_name(settings.model.model_name)
    positions = model_positions(model_name)
    max_length = settings.data.max_length
    if positions and max_length > positions:
        raise UserError(f"--max_length {max_length} is beyond the {positions} positions of --model_name "
                        f"{settings.model.model_name or model_name}; use at most {positions}")
    check_backbone(model_name, settings.lora)
    if settings.data.query_cut == "none":
        settings = replace(settings, data=replace(settings.data, max_length=positions or sys.maxsize))
    if settings.rng == "original" and distributed.env_world_size() > 1:
        raise UserError("--rng original draws every random number in one process's program order, so it cannot "
                        "run under several processes (WORLD_SIZE > 1); use --rng toolkit")
    return resolve_model_settings(settings), rounds, model_name, positions


def prepare_run(settings: RunSettings, method: str) -> RunPlan:
    """Check what can be checked before the model is built, and write nothing but the run directory's lock: first
    what needs no data (check_before_data), then the lock on --output_dir (another run holding it is refused), with
    --resume the run to continue (its config, state and metrics), every round's data, and with --resume that the
    data files and backbone are those the run started with. The plan's settings have device and dtype resolved.
    Seeds the run. Logs go to stderr until the run directory exists (building the default backbone reports its
    progress there). Under torchrun every process checks the same and joins the job here, before the model is
    built. The caller holds the plan's lock for the run (`with plan.lock`); a refusal here releases it."""
    distributed.setup_process_logging()
    settings, rounds, model_name, positions = check_before_data(settings)
    lock = RunLock()
    try:
        if settings.output.output_dir:
            distributed.from_main(lambda: lock.acquire(Path(settings.output.output_dir)))
            if not settings.output.resume:  # again under the lock: a run may have ended there since the first check
                refuse_existing_run(Path(settings.output.output_dir))
        rounds, data = load_rounds(settings.data)
        resumed = None
        if settings.output.resume:
            resumed = RunDirectory(Path(settings.output.output_dir), method, settings.flags, rounds, resume=True,
                                   checkpoint_dir=settings.output.checkpoint_dir)
            check_recorded_scores(resumed, settings.evaluation, settings.decoding.use_ground_truth_tools)
        inputs = {"model_name": model_name, "data": data_fingerprint(data_paths(settings.data, rounds)),
                  "backbone": backbone_fingerprint(model_name)}
        source = source_record(settings.model.model_name)
        if source is not None:
            inputs["gguf"] = source
        if resumed is not None:
            resumed.check_inputs(inputs)
    except BaseException:
        lock.release()
        raise
    set_seed(settings.seed)
    tool_names = list(dict.fromkeys(t for d in data for t in d.tools))  # round by round, in each round's order
    share = settings.data.validation_split
    data = [hold_out_validation(d, share, settings.seed, index) for index, d in enumerate(data)]
    return RunPlan(method, settings, rounds, data, tool_names, model_name, positions, resumed, inputs, lock)


def preflight(settings: RunSettings) -> None:
    """--preflight: check_before_data alone, so a script refuses a bad flag or backbone before its data step."""
    distributed.setup_process_logging()
    check_before_data(settings)
    logger.info("preflight: the flags, output place and backbone pass (no data read, nothing written)")


def check_recorded_scores(run: RunDirectory, evaluation: EvalSettings, ground_truth: bool) -> None:
    """metrics.jsonl of a resumed run holds every score its finished rounds recorded (evaluation_plan): else it was
    cut or replaced, and the forgetting matrix would miss them without a word."""
    modes = ["predicted"] + (["ground_truth_tools"] if ground_truth else [])
    recorded = {(r["round"], r["test_round"], r["mode"]) for r in run.records}
    for index in range(run.completed_rounds):
        for test_index in evaluation_plan(index, len(run.rounds), evaluation):
            for mode in modes:
                if (index, test_index, mode) not in recorded:
                    raise UserError(f"--resume: {run.path / 'metrics.jsonl'} lacks the {mode} scores of round "
                                    f"{run.rounds[index].name} on test set {run.rounds[test_index].name}, recorded "
                                    "when that round finished (the file was cut or replaced); restore it or start "
                                    "the run again")


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
        distributed.from_main(lambda: plan.lock.acquire(path))
        run = RunDirectory(path, plan.method, settings.flags, plan.rounds, resume=False,
                           checkpoint_dir=settings.output.checkpoint_dir)
    elif run.completed_rounds and not run.finished:
        load_checkpoint(model, run, settings.rng == "original")
    run.record_inputs(plan.data, prompt, plan.inputs)
    run.report_to(settings.output.report_to)
    run.started = plan.started
    if run.finished:
        return run
    distributed.setup_process_logging(settings.output.log_file or run.path / "train.log")
    if run.completed_rounds:
        logger.info("resuming %s after %d finished round(s)", run.path, run.completed_rounds)
    return run


def load_checkpoint(model, run: RunDirectory, original_rng: bool) -> None:
    """Load the last finished round's checkpoint (and with --rng original its generator states) into the model: each
    file checked first, so a damaged one is refused before the run directory is written."""
    checkpoint = run.checkpoint_path(run.completed_rounds - 1)
    states = read_rng_state(checkpoint) if original_rng else None
    model.load(checkpoint)
    if states is not None:
        restore_rng_state(states)


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
    A resumed run's model holds its last finished round's checkpoint already (start_run).
    """
    if run.finished:
        logger.info("%s already finished its %d round(s); nothing to train", run.path, len(data))
        return read_json(run.path / "summary.json", "run summary")
    original_rng = settings.rng == "original"
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
            write_checkpoint(model.save, run.checkpoint_path(index))
        for test_index in evaluation_plan(index, len(data), settings.evaluation):
            evaluate_round(settings, model, data[test_index], index, test_index, run)
            if data[test_index].validation:
                evaluate_validation(settings, model, data[test_index], index, test_index, run)
        if original_rng and run.writer:  # after evaluation: each test loader's iterator draws a seed, as the original's
            write_checkpoint(save_rng_state, run.checkpoint_path(index))
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


def read_rng_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The generator states `save_rng_state` wrote, checked; a checkpoint without them cannot resume exactly."""
    path = checkpoint / RNG_STATE_FILE
    if not path.is_file():
        raise UserError(f"--rng original: {path} is missing, so the run cannot continue its random draws where it "
                        "stopped; start the run again")
    states = read_safetensors(path, "checkpoint file")
    if "cpu" not in states or states["cpu"].dtype != torch.uint8:
        raise UserError(f"checkpoint file {path} holds no CPU generator state (\"cpu\", uint8)")
    return states


def restore_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Set torch's generators to states read by `read_rng_state`."""
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


def write_checkpoint(save: Callable[[Path], None], path: Path) -> None:
    """`save(path)` for an unfinished round's checkpoint; when it fails (a full disk, a permission error) the
    checkpoint is removed, so the run stays resumable from its last finished round, and the failure is one line."""
    try:
        save(path)
    except (OSError, WriteFailed) as err:
        remove_checkpoint(path)
        raise err if isinstance(err, WriteFailed) else write_failure(err, err.filename or path) from None


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
