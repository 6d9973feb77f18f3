"""TokMem, round after round: a frozen LM learns each round's tools as rows of its tool memory.

    python main_sequential.py --training_rounds 1-20:3,21-40:3,41-60:3 --eval_all_previous

Each round trains only its own tools' rows (and LoRA when on), saves the trainable state, evaluates the round's test
set (and every earlier one with --eval_all_previous), and records the forgetting matrix in the run directory.
"""

from __future__ import annotations

import logging
from typing import Sequence

from common import CliParser, UserError, positive_float, positive_int, run_cli
from experiment import print_final_report
from model import GROUND_TRUTH_STYLES, MEMORY_DTYPES, TOOL_INIT_NORMS, FunctionCallingModel
from sequential import add_common_flags, lora_settings_from, prepare_run, run_rounds, start_run
from training import RENORM_ROWS

logger = logging.getLogger("main_sequential")


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--lora_lr", type=positive_float, default=5e-4, help="learning rate of LoRA (with --use_lora)")
    parser.add_argument("--use_lora", action="store_true", help="also train a LoRA adapter on the backbone")
    parser.add_argument("--freeze_lora_after_first", action="store_true",
                        help="train LoRA in the first round only (needs --use_lora)")
    parser.add_argument("--lora_layer_indices", default=None,
                        help="comma list of decoder layers to adapt, negative counts from the end (default: all)")
    parser.add_argument("--decouple_embeddings", action="store_true",
                        help="separate input and output rows per tool (default: one row for both)")
    parser.add_argument("--renorm_active_tools", action="store_true",
                        help="after each step scale the round's rows to the mean norm of the learned ones "
                             "(run_n_rounds_main.sh turns this on)")
    parser.add_argument("--renorm_rows", default="all", choices=RENORM_ROWS,
                        help="which rows --renorm_active_tools scales: all (input and output rows) or output only "
                             "(the original's way)")
    parser.add_argument("--renorm_from_round", type=positive_int, default=1,
                        help="first round (1-based) that --renorm_active_tools applies to (the original: 3)")
    parser.add_argument("--tool_init_norm", default="embedding", choices=TOOL_INIT_NORMS,
                        help="norm of the orthogonal initial rows: the backbone's mean embedding norm, or unit "
                             "(the original's)")
    parser.add_argument("--memory_dtype", default="float32", choices=MEMORY_DTYPES,
                        help="precision of the tool rows: float32, or the backbone's dtype (model; the original's)")
    parser.add_argument("--use_ground_truth_tools", action="store_true",
                        help="also score with the gold tools at the tool positions (see --ground_truth_style)")
    parser.add_argument("--ground_truth_style", default="forced", choices=GROUND_TRUTH_STYLES,
                        help="forced: the gold tools take every tool position (first step, tool or end-of-turn "
                             "choices at call boundaries); replace: only tool tokens the model emits are replaced "
                             "(the original's way)")
    parser.add_argument("--unconstrained_decoding", action="store_true",
                        help="let a tool token come anywhere, also inside a call's unfinished JSON "
                             "(the original's way)")
    parser.add_argument("--offer_all_tools", action="store_true",
                        help="let generation emit every tool row, also later rounds' untrained ones (the original's "
                             "way); by default only the tools learned so far are offered")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.freeze_lora_after_first and not args.use_lora:
        raise UserError("--freeze_lora_after_first needs --use_lora (without it there is no LoRA to freeze)")
    lora = lora_settings_from(args) if args.use_lora else None
    plan = prepare_run(args, "tokmem")
    model = FunctionCallingModel(
        plan.model_name,
        len(plan.tool_names),
        plan.tool_names,
        device=args.device,
        dtype=args.dtype,
        decouple_embeddings=args.decouple_embeddings,
        lora_config=lora,
        memory_dtype=args.memory_dtype,
    )
    model.initialize_rows(seed=args.seed, norm=args.tool_init_norm)
    model.constrain_calls = not args.unconstrained_decoding
    run = start_run(args, plan, model)
    data = plan.data
    logger.info("run directory %s; %d tools over %d rounds; parameters %s",
                run.path, len(plan.tool_names), len(data), model.parameter_breakdown())
    summary = run_rounds(
        args, model, data, run,
        prepare_round=lambda i: data[i].train,
        train_lora_for=lambda i: args.use_lora and not (args.freeze_lora_after_first and i > 0),
    )
    print_final_report(run, summary)
    return 0


if __name__ == "__main__":
    run_cli(main)
