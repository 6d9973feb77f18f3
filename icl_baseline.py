"""In-context baselines: the tools' descriptions sit in the prompt, all of them (ICL) or the top-k retrieved (RAG).

    python icl_baseline.py --test_data data/test/function_calling_test_tools1-20_3calls.json
    python icl_baseline.py --test_data data/test/function_calling_test_tools1-20_3calls.json --use_rag --retrieval_k 5

The frozen backbone reads the offered tools as JSON in the system turn of its chat template (dataset.tool_system_prompt)
and answers with one {"name", "arguments"} object per call (dataset.icl_answer_text, the format the tiny backbone was
pretrained on). The answer is parsed into calls, each call's tool is inferred (`infer_tool`), and the predictions are
scored with eval.score_predictions, so the numbers sit beside TokMem's and LoRA's. The prompt length per query is
reported for ICL, RAG and TokMem's description-free prompt: the context overhead that tool memory removes.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm import tqdm

from common import (
    CliParser,
    UserError,
    atomic_write_json,
    atomic_write_text,
    positive_int,
    read_json,
    run_cli,
    set_seed,
    setup_logging,
)
from dataset import build_prompt_ids, end_of_turn_id, left_pad_collate, load_samples, tool_system_prompt
from eval import format_metrics_table, parse_function_call, score_predictions
from experiment import RunDirectory, default_output_dir
from model import load_base_model, load_tokenizer, resolve_device, resolve_dtype
import round_files
from tool_retrieval import DEFAULT_ENCODER, ToolRetriever, parameter_names, recall_at_k

logger = logging.getLogger("icl_baseline")

UNKNOWN_TOOL = "<unknown>"
ARGUMENT_FIELDS = ("arguments", "parameters")
_OPENING = re.compile(r"[\[{]")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class EvaluatedSet:
    """The one 'round' of an in-context run: the test set(s) it scored, named by tool range or file stem."""

    name: str


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def split_paths(values: Sequence[str] | None) -> list[Path]:
    """Paths from a repeated flag whose values may also be comma lists; each path once, in order."""
    paths: list[Path] = []
    for value in values or []:
        for part in value.split(","):
            if part.strip() and Path(part.strip()) not in paths:
                paths.append(Path(part.strip()))
    return paths


def descriptions_path_for(test_path: Path) -> Path:
    """The descriptions file DESIGN.md pairs with a test file (data/test/…tools1-20_3calls.json -> data/…tools1-20.json)."""
    parsed = round_files.parse_test_path(test_path)
    if parsed is None:
        raise UserError(f"cannot tell which tool descriptions go with {test_path}; pass --tool_descriptions")
    data_dir, start, end, _ = parsed
    return round_files.descriptions_path(data_dir, start, end)


def data_command_for(test_path: Path) -> str | None:
    """The xlam_datasets.py command that writes a DESIGN.md test file and its descriptions; None for other names."""
    parsed = round_files.parse_test_path(test_path)
    if parsed is None:
        return None
    data_dir, start, end, calls = parsed
    return round_files.data_command(data_dir, start, end, test_calls=calls)


def require_file(path: Path, what: str, test_path: Path) -> None:
    """A missing input file is a one-line error that names it and, for DESIGN.md names, the command that makes it."""
    if path.is_file():
        return
    command = data_command_for(test_path)
    raise UserError(f"{what} not found: {path}" + (f"; make it with: {command}" if command else ""))


def load_descriptions(paths: Sequence[Path]) -> dict[str, dict]:
    """Merge descriptions files `{tool_name: {"name", "description", "parameters"}}`, in file and key order."""
    merged: dict[str, dict] = {}
    for path in paths:
        data = read_json(path, "tool descriptions file")
        if not isinstance(data, dict) or not data:
            raise UserError(f"tool descriptions file {path}: expected a non-empty object keyed by tool name")
        for name, desc in data.items():
            if not isinstance(desc, dict):
                raise UserError(f"tool descriptions file {path}: the description of {name!r} must be an object")
            if name in merged and merged[name] != desc:
                logger.warning("tool %r is described in more than one file; keeping the first description", name)
            merged.setdefault(name, desc if desc.get("name") == name else {"name": name, **_without(desc, "name")})
    return merged


def _without(mapping: Mapping, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def load_test_set(paths: Sequence[Path], descriptions: Mapping[str, dict], max_samples: int | None,
                  seed: int) -> list[dict]:
    """Read the test files; every gold tool must be described. `max_samples` keeps a seeded subset, in file order."""
    samples: list[dict] = []
    for path in paths:
        require_file(path, "data file", path)
        for index, sample in enumerate(load_samples(path)):
            missing = [tool for tool in sample["tools"] if tool not in descriptions]
            if missing:
                raise UserError(f"test file {path}, row {index}: tool {missing[0]!r} has no description in "
                                "--tool_descriptions")
            samples.append(sample)
    if max_samples is not None and max_samples < len(samples):
        kept = sorted(random.Random(seed).sample(range(len(samples)), max_samples))
        samples = [samples[i] for i in kept]
    return samples


def evaluated_set_name(paths: Sequence[Path]) -> str:
    """`1-20` for a DESIGN.md test file (its tool range), else the file stem; several are joined with `+`."""
    names = []
    for path in paths:
        parsed = round_files.parse_test_path(path)
        names.append(round_files.range_name(*parsed[1:3]) if parsed else path.stem)
    return "+".join(names)


# ----------------------------------------------------------------------------------------------------------------------
# Answers: calls and their tools


def parse_answer(text: str) -> list[dict | str]:
    """The calls of a generated answer, in order: each parsed object, or the raw text of a call that does not parse.

    Every JSON object in the text is a call: one per line as the prompt asks, several on one line, one object
    pretty-printed over several lines, or a JSON list of objects. A `{` that starts no JSON object is read up to the
    end of its line with eval.parse_function_call (a Python dict literal, say); failing that it is one unparseable
    call (a truncated answer, for instance). Text outside objects (prose, code fences) is ignored.
    """
    calls: list[dict | str] = []
    position = 0
    while (match := _OPENING.search(text, position)) is not None:
        start = match.start()
        try:
            value, position = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if value is not None:
            calls.extend(_objects(value))
            continue
        if text[start] == "[":
            position = start + 1
            continue
        line_end = text.find("\n", start)
        position = len(text) if line_end < 0 else line_end
        parsed = parse_function_call(text[start:position])
        calls.append(parsed if parsed is not None else text[start:position].strip())
    return calls


def _objects(value: object) -> list[dict]:
    """The call objects in a decoded JSON value: the object itself, or the objects of a list."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return []


def _known_name(call: dict, descriptions: Mapping[str, dict]) -> str | None:
    name = call.get("name")
    return name if isinstance(name, str) and name in descriptions else None


def call_arguments(call: dict, descriptions: Mapping[str, dict]) -> dict | None:
    """A call's arguments: its "arguments" (or "parameters") field, a JSON string of it parsed; None when unreadable.

    An object without such a field is taken as the arguments themselves, less a "name" that names a known tool.
    """
    for field_name in ARGUMENT_FIELDS:
        if field_name in call:
            return parse_function_call(call[field_name])
    return _without(call, "name") if _known_name(call, descriptions) else call


def _jaccard(a: set[str], b: set[str]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def infer_tool(call: dict, descriptions: Mapping[str, dict]) -> str | None:
    """The tool a parsed call means: the "name" field when it names a known tool, else the tool whose parameter names
    best match the argument keys (Jaccard similarity).

    None when nothing matches (no argument keys, or no key is any tool's parameter) and when the best match is tied:
    keys that do not tell the tools apart give no tool rather than one picked arbitrarily.
    """
    named = _known_name(call, descriptions)
    if named is not None:
        return named
    arguments = call_arguments(call, descriptions)
    if not arguments:
        return None
    keys = set(arguments)
    scores = {tool: _jaccard(keys, set(parameter_names(desc))) for tool, desc in descriptions.items()}
    best = max(scores.values(), default=0.0)
    winners = [tool for tool, score in scores.items() if score == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def answer_to_calls(text: str, descriptions: Mapping[str, dict]) -> tuple[list[str], list[str]]:
    """Predicted tools and arguments JSON of an answer, as eval.score_predictions takes them.

    A call whose tool cannot be inferred gets the tool UNKNOWN_TOOL; one whose arguments do not parse gets its raw
    text (or "" when it has none), which the scorer counts as a parse error.
    """
    tools, calls = [], []
    for call in parse_answer(text):
        if isinstance(call, str):
            tools.append(UNKNOWN_TOOL)
            calls.append(call)
            continue
        arguments = call_arguments(call, descriptions)
        tools.append(infer_tool(call, descriptions) or UNKNOWN_TOOL)
        calls.append("" if arguments is None else json.dumps(arguments, ensure_ascii=False))
    return tools, calls


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and generation


def icl_prompt_ids(tokenizer, user_input: str, listing: Sequence[dict]) -> list[int]:
    """The chat-template prompt with the listed tools' descriptions as JSON in the system turn."""
    return build_prompt_ids(tokenizer, user_input, tool_system_prompt(listing))


def offered_tools(samples: Sequence[dict], descriptions: Mapping[str, dict], retriever: ToolRetriever | None,
                  k: int) -> list[list[str]]:
    """Per query, the tools its prompt lists: all described tools (ICL), or the top k by retrieval score (RAG)."""
    if retriever is None:
        return [list(descriptions) for _ in samples]
    ranked = retriever.retrieve_batch([sample["user_input"] for sample in samples], k)
    return [[name for name, _ in row] for row in ranked]


def token_stats(lengths: Sequence[int]) -> dict[str, float | int]:
    """Mean and max of prompt lengths in tokens."""
    return {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}


def prompt_lengths(tokenizer, samples: Sequence[dict], descriptions: Mapping[str, dict],
                   prompts: Sequence[list[int]], rag: bool) -> dict:
    """Prompt tokens per query for ICL (every tool listed), RAG (when run) and TokMem (no descriptions at all).

    `prompts` are the run's own prompts: RAG's when `rag`, else ICL's (the ICL prompts are then built here too).
    """
    icl_prompts = prompts
    if rag:
        listing = list(descriptions.values())
        icl_prompts = [icl_prompt_ids(tokenizer, sample["user_input"], listing) for sample in samples]
    stats = {"icl": token_stats([len(ids) for ids in icl_prompts])}
    if rag:
        stats["rag"] = token_stats([len(ids) for ids in prompts])
    stats["tool_memory"] = token_stats([len(build_prompt_ids(tokenizer, sample["user_input"])) for sample in samples])
    return stats


def _stop_ids(tokenizer) -> list[int]:
    return sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})


def _decode_answer(tokenizer, new_ids: Sequence[int], stops: Sequence[int]) -> str:
    """The answer text: new tokens up to the first stop token, special tokens dropped."""
    end = next((i for i, token in enumerate(new_ids) if token in stops), len(new_ids))
    return tokenizer.decode(list(new_ids[:end]), skip_special_tokens=True).strip()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[list[int]], samples: Sequence[dict], batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers for token-id prompts: batches of similar length, left-padded, decoded with the KV cache."""
    stops = _stop_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for first in tqdm(range(0, len(order), batch_size), desc="generating", leave=False, dynamic_ncols=True):
        chunk = order[first:first + batch_size]
        items = [{"input_ids": prompts[i], "labels": None, "gold_tools": samples[i]["tools"],
                  "gold_calls": samples[i]["function_calls"], "user_input": samples[i]["user_input"]} for i in chunk]
        batch = left_pad_collate(items, tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        output = model.generate(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, index in enumerate(chunk):
            answers[index] = _decode_answer(tokenizer, output[row, width:].tolist(), stops)
    return answers


def warn_if_too_long(model, prompts: Sequence[list[int]], max_new_tokens: int) -> None:
    """Log when prompts plus answers exceed the positions the model was built for."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    over = sum(len(ids) + max_new_tokens > limit for ids in prompts)
    if over:
        logger.warning("%d of %d prompts plus --max_new_tokens %d exceed the model's %d positions",
                       over, len(prompts), max_new_tokens, limit)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test_data", action="append", required=True,
                        help="test file(s); repeat the flag or give a comma list to score several rounds at once")
    parser.add_argument("--tool_descriptions", action="append", default=None,
                        help="descriptions file(s), repeatable or a comma list (default: the ones the test files pair "
                             "with: data/tool_descriptions_tools{range}.json)")
    parser.add_argument("--model_name", default=None, help="HF id or local dir (default: the embedded tiny backbone)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max_samples", type=positive_int, default=None, help="score a seeded subset of this size")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--max_new_tokens", type=positive_int, default=256)
    parser.add_argument("--output", default=None,
                        help="a run directory, or a results file when it ends in .json (default: runs/<method>_<time>)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--use_rag", action="store_true", help="list only the top --retrieval_k retrieved tools")
    parser.add_argument("--retrieval_k", type=positive_int, default=5)
    parser.add_argument("--retriever_model", default=DEFAULT_ENCODER, help="sentence-transformers encoder for RAG")
    return parser


def check_output(output: Path) -> None:
    """A results file must not be a directory; a run directory must not already hold a run."""
    if output.suffix == ".json":
        if output.is_dir():
            raise UserError(f"--output {output} is a directory, not a results file")
    elif output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory (a results file must end in .json)")
    elif (output / "results.json").exists() or (output / "state.json").exists():
        raise UserError(f"--output {output} already holds a run; choose another --output")


def retrieval_report(retriever: ToolRetriever, samples: Sequence[dict], offered: Sequence[list[str]], k: int,
                     encoder: str) -> dict:
    """recall@k of the gold tools (the ceiling of RAG) and the share of queries with every gold tool retrieved."""
    covered = [set(sample["tools"]) <= set(names) for sample, names in zip(samples, offered)]
    return {
        "k": k,
        "encoder": encoder,
        "recall_at_k": recall_at_k(retriever, samples, k),
        "all_gold_retrieved": sum(covered) / len(covered),
    }


def predictions_for(samples: Sequence[dict], answers: Sequence[str], descriptions: Mapping[str, dict],
                    offered: Sequence[list[str]] | None, prompts: Sequence[list[int]]) -> list[dict]:
    """The prediction dicts of eval.score_predictions, with the answer text, prompt length and offered tools."""
    predictions = []
    for index, (sample, answer) in enumerate(zip(samples, answers)):
        tools, calls = answer_to_calls(answer, descriptions)
        prediction = {"user_input": sample["user_input"], "predicted_tools": tools, "function_calls": calls,
                      "gold_tools": sample["tools"], "gold_calls": sample["function_calls"],
                      "generated_text": answer, "prompt_tokens": len(prompts[index])}
        if offered is not None:
            prediction["offered_tools"] = offered[index]
        predictions.append(prediction)
    return predictions


def format_prompt_table(stats: dict, num_tools: int, k: int | None) -> str:
    """Prompt tokens per query (mean, max) for ICL, RAG and tool memory."""
    labels = {"icl": f"ICL (all {num_tools} tools)", "rag": f"RAG (top {k} tools)", "tool_memory": "tool memory (TokMem)"}
    lines = [f"{'prompt tokens per query':<26}{'mean':>10}{'max':>8}"]
    lines += [f"{labels[key]:<26}{value['mean']:>10.1f}{value['max']:>8d}" for key, value in stats.items()]
    return "\n".join(lines)


def write_run_directory(output: Path, method: str, args, started: float, results: dict,
                        predictions: Sequence[dict], num_parameters: int) -> None:
    """config.json, metrics.jsonl, predictions.jsonl, results.json and a one-round summary.json (DESIGN.md shape)."""
    run = RunDirectory(output, method, args, [EvaluatedSet(results["evaluated"])], resume=False)
    run.started = started
    run.add_metrics(0, 0, results["metrics"], "predicted")
    run.finish_round(0, {"prompt_tokens": results["prompt_tokens"]})
    atomic_write_text(output / "predictions.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    atomic_write_json(output / "results.json", results)
    extra = {"parameters": {"backbone": num_parameters, "tool_memory": 0, "lora": 0, "trainable": 0},
             "prompt_tokens": results["prompt_tokens"]}
    if "retrieval" in results:
        extra["retrieval"] = results["retrieval"]
    run.write_summary(extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate, score and report one in-context baseline run."""
    args = build_parser().parse_args(argv)
    started = time.time()
    setup_logging()
    method = "icl_rag" if args.use_rag else "icl"
    output = Path(args.output) if args.output else default_output_dir(method)
    check_output(output)
    set_seed(args.seed)
    test_paths = split_paths(args.test_data)
    if not test_paths:
        raise UserError("--test_data names no file")
    description_paths = split_paths(args.tool_descriptions)
    if not description_paths:
        for path in test_paths:
            require_file(descriptions_path_for(path), "tool descriptions file", path)
        description_paths = split_paths([str(descriptions_path_for(path)) for path in test_paths])
    descriptions = load_descriptions(description_paths)
    samples = load_test_set(test_paths, descriptions, args.max_samples, args.seed)

    from sequential import resolve_model_name

    model_name = resolve_model_name(args.model_name)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(model_name)
    model = load_base_model(model_name, device, resolve_dtype(args.dtype, device))
    if output.suffix != ".json":
        setup_logging(output / "icl_baseline.log")
    logger.info("%s on %d test samples, %d described tools, model %s", method, len(samples), len(descriptions),
                model_name)

    retriever = ToolRetriever(descriptions, args.retriever_model, device=device.type) if args.use_rag else None
    offered = offered_tools(samples, descriptions, retriever, args.retrieval_k)
    prompts = [icl_prompt_ids(tokenizer, sample["user_input"], [descriptions[name] for name in names])
               for sample, names in zip(samples, offered)]
    warn_if_too_long(model, prompts, args.max_new_tokens)
    generation_start = time.time()
    answers = generate_answers(model, tokenizer, prompts, samples, args.batch_size, args.max_new_tokens)
    generation_seconds = time.time() - generation_start
    predictions = predictions_for(samples, answers, descriptions, offered if args.use_rag else None, prompts)
    results = {
        "method": method,
        "model_name": model_name,
        "evaluated": evaluated_set_name(test_paths),
        "test_data": [str(p) for p in test_paths],
        "tool_descriptions": [str(p) for p in description_paths],
        "num_tools": len(descriptions),
        "metrics": score_predictions(predictions),
        "prompt_tokens": prompt_lengths(tokenizer, samples, descriptions, prompts, args.use_rag),
        "generation_seconds": round(generation_seconds, 1),
    }
    if retriever is not None:
        results["retrieval"] = retrieval_report(retriever, samples, offered, args.retrieval_k, args.retriever_model)
    results["wall_seconds"] = round(time.time() - started, 1)
    if output.suffix == ".json":
        atomic_write_json(output, {**results, "predictions": predictions})
    else:
        num_parameters = sum(p.numel() for p in model.parameters())
        write_run_directory(output, method, args, started, results, predictions, num_parameters)
    print_report(results, output, args.retrieval_k if args.use_rag else None)
    return 0


def print_report(results: dict, output: Path, k: int | None) -> None:
    """The CLI's final tables: scores, prompt tokens and (RAG) retrieval recall."""
    print(f"{results['method']} on test set {results['evaluated']} ({results['num_tools']} described tools):")
    print(format_metrics_table(results["metrics"]))
    print()
    print(format_prompt_table(results["prompt_tokens"], results["num_tools"], k))
    retrieval = results.get("retrieval")
    if retrieval:
        print(f"\nretrieval recall@{retrieval['k']} of the gold tools: {retrieval['recall_at_k']:.4f} "
              f"(every gold tool retrieved: {retrieval['all_gold_retrieved']:.4f})")
    print(f"\n{'results file' if output.suffix == '.json' else 'run directory'}: {output}")


if __name__ == "__main__":
    run_cli(main)
