"""TokMem, round after round: a frozen LM learns each round's tools as rows of its tool memory.

    python main_sequential.py --training_rounds 1-20:3,21-40:3,41-60:3 --eval_all_previous

Each round trains only its own tools' rows (and LoRA when on), saves the trainable state, evaluates the round's test
set (and every earlier one with --eval_all_previous), and records the forgetting matrix in the run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import distributed
from common import CliParser, UserError, non_negative_float, positive_float, positive_int
from decoding import GROUND_TRUTH_STYLES
from experiment import print_final_report
from model import STOP_TOKENS, TRAINING_PASSES, FunctionCallingModel, resolve_training_pass
from sequential import RunPlan, preflight, prepare_run, run_rounds, start_run
from settings import (RNG_MODES, DecodingSettings, RunSettings, add_sequential_flags, from_flags, lora_settings,
                      run_settings, train_settings)
from tool_memory import MEMORY_DTYPES, TOOL_INIT_NORMS
from training import RENORM_ROWS, TrainSettings

logger = logging.getLogger("main_sequential")

ORIGINAL_TOOL_SLOTS = 248  # the original caps its tool slots at Llama-3's reserved special tokens


@dataclass(frozen=True)
class MemorySettings:
    """TokMem's tool memory: one row or two per tool, their initial norm and precision, and LoRA beside them."""

    decouple_embeddings: bool = False
    tool_init_norm: str = "embedding"
    memory_dtype: str = "float32"
    use_lora: bool = False
    freeze_lora_after_first: bool = False
    training_pass: str = "auto"  # model.resolve_training_pass; --rng original needs one pass

    def train_lora_in(self, round_index: int) -> bool:
        """LoRA trains in every round, or with --freeze_lora_after_first in the first only."""
        return self.use_lora and not (self.freeze_lora_after_first and round_index > 0)


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    add_sequential_flags(parser)
    parser.add_argument("--lora_lr", type=positive_float, default=TrainSettings.lora_lr,
                        help="learning rate of LoRA (with --use_lora)")
    parser.add_argument("--use_lora", action="store_true", help="also train a LoRA adapter on the backbone")
    parser.add_argument("--freeze_lora_after_first", action="store_true",
                        help="train LoRA in the first round only (needs --use_lora)")
    parser.add_argument("--lora_layer_indices", default=None,
                        help="comma list of decoder layers to adapt, negative counts from the end (default: all)")
    parser.add_argument("--training_pass", default=MemorySettings.training_pass, choices=TRAINING_PASSES,
                        help="a training batch as one decoder pass, or split (the prompt without autograd, then the "
                             "answer on its cache; only while no backbone parameter trains); auto: one on CUDA, "
                             "split elsewhere (default; --rng original runs one pass)")
    parser.add_argument("--decouple_embeddings", action="store_true",
                        help="separate input and output rows per tool (default: one row for both)")
    parser.add_argument("--renorm_active_tools", action="store_true",
                        help="after each step scale the round's rows to the mean norm of the learned ones "
                             "(run_n_rounds_main.sh turns this on)")
    parser.add_argument("--renorm_rows", default=TrainSettings.renorm_rows, choices=RENORM_ROWS,
                        help="which rows --renorm_active_tools scales: all (input and output rows) or output only "
                             "(the original's way)")
    parser.add_argument("--renorm_from_round", type=positive_int, default=TrainSettings.renorm_from_round,
                        help="first round (1-based) that --renorm_active_tools applies to (the original: 3)")
    parser.add_argument("--prototype_weight", type=non_negative_float, default=TrainSettings.prototype_weight,
                        help="weight of the prototype loss: from round 2 on, draws around each earlier tool's query "
                             "prototype must still score that tool (0: off, the paper's method and the default; an "
                             "extension the paper does not have)")
    parser.add_argument("--prototype_samples", type=positive_int, default=TrainSettings.prototype_samples,
                        help="draws from the earlier tools' prototypes per step (with --prototype_weight)")
    parser.add_argument("--tool_init_norm", default=MemorySettings.tool_init_norm, choices=TOOL_INIT_NORMS,
                        help="norm of the orthogonal initial rows: the backbone's mean embedding norm, or unit "
                             "(the original's)")
    parser.add_argument("--memory_dtype", default=MemorySettings.memory_dtype, choices=MEMORY_DTYPES,
                        help="precision of the tool rows: float32, or the backbone's dtype (model; the original's)")
    parser.add_argument("--use_ground_truth_tools", action="store_true",
                        help="also score with the gold tools at the tool positions (see --ground_truth_style)")
    parser.add_argument("--ground_truth_style", default=DecodingSettings.ground_truth_style,
                        choices=GROUND_TRUTH_STYLES,
                        help="forced: the gold tools take every tool position (first step, tool or end-of-turn "
                             "choices at call boundaries); replace: only tool tokens the model emits are replaced "
                             "(the original's way)")
    parser.add_argument("--unconstrained_decoding", action="store_true",
                        help="let a tool token come anywhere, also inside a call's unfinished JSON "
                             "(the original's way)")
    parser.add_argument("--stop_tokens", default=DecodingSettings.stop_tokens, choices=STOP_TOKENS,
                        help="where an answer ends: eot (end-of-turn), or generation_config (also every "
                             "end-of-sequence id of the model's generation config, as Hugging Face generate stops: "
                             "the original's way)")
    parser.add_argument("--rng", default=RunSettings.rng, choices=RNG_MODES,
                        help="toolkit: each round seeds its own draws (seed + round), so resume and several processes "
                             "are exact; original: one seed, then every draw (rows, LoRA, shuffles, dropout) from "
                             "torch's global generator in the original's order, so a seed gives the original's "
                             "batches and rows (one process only; PRESET=paper)")
    parser.add_argument("--offer_all_tools", action="store_true",
                        help="let generation emit every tool row, also later rounds' untrained ones (the original's "
                             "way); by default only the tools learned so far are offered")
    return parser


def settings_from(args) -> tuple[RunSettings, MemorySettings]:
    """The parsed flags as the run's settings and the tool memory's."""
    memory = from_flags(MemorySettings, args)
    if args.rng == "original" and memory.training_pass == "split":
        raise UserError("--training_pass split: --rng original runs each batch in one pass, as the original does "
                        "(its dropout masks have the one-pass shapes); use one or auto")
    if memory.freeze_lora_after_first and not memory.use_lora:
        raise UserError("--freeze_lora_after_first needs --use_lora (without it there is no LoRA to freeze)")
    train = train_settings(args, lora_lr=args.lora_lr, renorm_active_tools=args.renorm_active_tools,
                           renorm_rows=args.renorm_rows, renorm_from_round=args.renorm_from_round,
                           prototype_weight=args.prototype_weight, prototype_samples=args.prototype_samples)
    lora = lora_settings(args, args.lora_layer_indices) if memory.use_lora else None
    return run_settings(args, train, lora, from_flags(DecodingSettings, args)), memory


def build_model(plan: RunPlan, memory: MemorySettings) -> FunctionCallingModel:
    """The backbone with the run's tool memory (initialised from the seed) and LoRA when asked."""
    settings = plan.settings
    model = FunctionCallingModel(
        plan.model_name,
        len(plan.tool_names),
        plan.tool_names,
        device=settings.model.device,
        dtype=settings.model.dtype,
        decouple_embeddings=memory.decouple_embeddings,
        lora_config=settings.lora,
        memory_dtype=memory.memory_dtype,
    )
    if settings.rng == "original":
        # The original draws one orthogonal matrix over its tool slots: as many as the last round's last rank, at
        # most Llama-3's 248 reserved tokens (its constant), from the global generator right after LoRA's draws.
        slots = min(max(spec.end for spec in plan.rounds), ORIGINAL_TOOL_SLOTS)
        model.initialize_rows(seed=None, norm=memory.tool_init_norm, drawn_rows=slots)
        model.training_pass = "one"
    else:
        model.initialize_rows(seed=settings.seed, norm=memory.tool_init_norm)
        model.training_pass = resolve_training_pass(memory.training_pass, model.device)
    model.constrain_calls = not settings.decoding.unconstrained_decoding
    model.set_stop_tokens(settings.decoding.stop_tokens)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    settings, memory = settings_from(build_parser().parse_args(argv))
    if settings.output.preflight:
        preflight(settings)
        return 0
    plan = prepare_run(settings, "tokmem")
    with plan.lock:
        model = build_model(plan, memory)
        run = start_run(plan, model)
        data = plan.data
        logger.info("run directory %s; %d tools over %d rounds; parameters %s",
                    run.path, len(plan.tool_names), len(data), model.parameter_breakdown())
        summary = run_rounds(plan.settings, model, data, run, prepare_round=lambda i: data[i].train,
                             train_lora_for=memory.train_lora_in)
    if run.writer:
        print_final_report(run, summary)
    return 0


if __name__ == "__main__":
    distributed.run_cli(main)
