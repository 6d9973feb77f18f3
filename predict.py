"""Answer queries with a finished run's trained memory (TokMem) or adapter (the LoRA baseline).

    python predict.py runs/tokmem_X "What is the weather in Paris?" "Convert 10 USD to EUR"
    python predict.py runs/tokmem_X --round 1 --input queries.jsonl --tools get_weather,convert_currency
    echo "What is the weather in Paris?" | python predict.py runs/lora_Y

Loads the run's last finished round (or --round N) from its checkpoint, on the backbone its config.json recorded, with
the run's prompt format and decoding rules, and prints one JSON line per query: the query, its calls
(`{"name", "arguments"}`; arguments that do not parse stay as their text) and the raw generated text.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from common import CliParser, UserError, positive_int, read_json, run_cli, setup_logging
from dataset import encode_sample
from decoding import left_pad
from eval import parse_function_call
from experiment import backbone_fingerprint, fingerprint_changes, gguf_digest
from gguf_backbone import converted_sha256, is_gguf_name
from model import DTYPES, LoraSettings
from settings import resolve_model_name

logger = logging.getLogger("predict")

METHODS = ("tokmem", "lora", "lora_replay")


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory of main_sequential.py or lora_sequential.py")
    parser.add_argument("queries", nargs="*", help="the queries (default: --input, else one query per stdin line)")
    parser.add_argument("--round", type=positive_int, default=None,
                        help="the round whose checkpoint answers (1-based; default: the last finished round)")
    parser.add_argument("--input", type=Path, default=None,
                        help="a JSON Lines file of queries: one string, or object with user_input, per line")
    parser.add_argument("--tools", default=None,
                        help="comma list of the tools generation may emit (TokMem; default: the round's learned "
                             "tools, as the run offered them)")
    parser.add_argument("--model_name", default=None,
                        help="the backbone, where it now lives, as main_sequential.py takes it (a .gguf file or "
                             "smollm2-135m-instruct too; default: the one the run recorded); it must have the "
                             "recorded weights")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["auto", *DTYPES],
                        help="backbone dtype (default: the run's)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="queries per generation batch")
    parser.add_argument("--max_new_tokens", type=positive_int, default=None,
                        help="most tokens per answer (default: the run's)")
    return parser


def read_run(run_dir: Path) -> tuple[dict, int]:
    """The run's config.json and its number of finished rounds; a directory of another method is refused."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} holds no run (no config.json)")
    config = read_json(run_dir / "config.json", "run config")
    method = config.get("method")
    if method not in METHODS:
        raise UserError(f"{run_dir} is a {method} run; predict.py answers with a TokMem or LoRA-baseline run "
                        f"({', '.join(METHODS)})")
    state = read_json(run_dir / "state.json", "run state") if (run_dir / "state.json").is_file() else {}
    finished = int(state.get("completed_rounds", 0))
    if not finished:
        raise UserError(f"{run_dir} has no finished round yet")
    return config, finished


def checkpoint_of(run_dir: Path, config: dict, round_number: int | None, finished: int) -> Path:
    """The checkpoint directory of the asked round (default: the last finished one)."""
    number = round_number or finished
    if number > finished:
        raise UserError(f"--round {number}: {run_dir} finished {finished} round(s)")
    root = config["args"].get("checkpoint_dir") or run_dir / "checkpoints"
    path = Path(root) / f"round_{number}"
    if not path.is_dir():
        raise UserError(f"--round {number}: checkpoint {path} is missing (a run keeps only its last round's "
                        "checkpoint unless it ran with --save_checkpoints)")
    return path


def backbone_of(config: dict, given: str | None) -> str:
    """The backbone to load: --model_name (resolved, so a GGUF gives its converted folder) or the recorded one, refused
    when its files differ from the fingerprint the run recorded (config.json's inputs; where it recorded none, when
    it is another model name) or, for a run on a GGUF, when it was converted from another file."""
    inputs = config.get("inputs") or {}
    flag = config["args"].get("model_name")
    recorded_name = inputs.get("model_name") or resolve_model_name(flag)
    name = resolve_model_name(given) if given else recorded_name
    if not given and not Path(name).is_dir() and (flag is None or is_gguf_name(flag)):
        name = resolve_model_name(flag)  # the embedded backbone, or the GGUF's conversion, of a run made elsewhere
    recorded_gguf = gguf_digest(inputs).get("sha256")
    if recorded_gguf and converted_sha256(name) != recorded_gguf:
        raise UserError(f"backbone {name} is not the one the run trained on: the run's was converted from the GGUF "
                        f"file with sha256 {recorded_gguf}, this one from {converted_sha256(name) or 'no GGUF'}")
    recorded = inputs.get("backbone")
    if isinstance(recorded, dict) and "hub id" not in recorded:
        changes = fingerprint_changes("file ", recorded, backbone_fingerprint(name))
        if changes:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            raise UserError(f"backbone {name} is not the one the run trained on: {changes[0]}{more}")
    elif given and Path(name).resolve() != Path(recorded_name).resolve():
        raise UserError(f"--model_name {given} differs from the run's backbone {recorded_name} (the run recorded no "
                        "fingerprint of its files to compare)")
    return name


def read_queries(queries: Sequence[str], input_file: Path | None) -> list[str]:
    """The queries from the arguments, else --input (JSON Lines), else stdin (one per line)."""
    if queries:
        return list(queries)
    if input_file is None:
        return [line.strip() for line in sys.stdin if line.strip()]
    if not input_file.is_file():
        raise UserError(f"--input {input_file} not found")
    found = []
    for number, line in enumerate(input_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--input {input_file}, line {number}: not valid JSON ({err.msg})") from None
        query = row.get("user_input") if isinstance(row, dict) else row
        if not isinstance(query, str) or not query.strip():
            raise UserError(f"--input {input_file}, line {number}: expected a query string or an object with a "
                            "user_input string")
        found.append(query)
    return found


def checkpoint_meta(config: dict, checkpoint: Path) -> dict:
    """The checkpoint's metadata: TokMem's tool_memory.json or the LoRA baseline's markers.json."""
    from lora_sequential import MARKERS_FILE
    from model import MEMORY_META_FILE

    name = MEMORY_META_FILE if config["method"] == "tokmem" else MARKERS_FILE
    if not (checkpoint / name).is_file():
        raise UserError(f"checkpoint {checkpoint} is incomplete: expected {name}")
    return read_json(checkpoint / name, "checkpoint metadata")


def offered_tools(config: dict, meta: dict, tools: str | None) -> list[str] | None:
    """--tools as a list (None: not given): the run's tools, and TokMem only (the LoRA baseline's markers are plain
    text, which cannot be restricted)."""
    if tools is None:
        return None
    if config["method"] != "tokmem":
        raise UserError("--tools: the LoRA baseline writes its tool markers as text, which cannot be restricted")
    names = [t.strip() for t in tools.split(",") if t.strip()]
    unknown = [t for t in names if t not in meta["tool_names"]]
    if not names or unknown:
        raise UserError(f"--tools: {', '.join(unknown) or 'empty'}: not among the run's tools "
                        f"({', '.join(meta['tool_names'][:5])}, ...)")
    return names


def load_model(config: dict, meta: dict, checkpoint: Path, model_name: str, device: str, dtype: str):
    """The run's model with the checkpoint's trained state, set to decode as the run did."""
    args = config["args"]
    if config["method"] == "tokmem":
        from model import FunctionCallingModel

        lora = LoraSettings(**meta["lora"]) if meta.get("lora") else None
        model = FunctionCallingModel(model_name, len(meta["tool_names"]), meta["tool_names"], device=device,
                                     dtype=dtype, decouple_embeddings=meta["decouple_embeddings"], lora_config=lora,
                                     memory_dtype=meta.get("memory_dtype", "float32"))
        model.constrain_calls = not args.get("unconstrained_decoding", False)
        model.set_stop_tokens(args.get("stop_tokens", "eot"))
    else:
        from lora_sequential import MarkerLoRAModel

        model = MarkerLoRAModel(model_name, meta["tool_names"], LoraSettings(**meta["lora"]), device=device,
                                dtype=dtype, marker_style=meta["marker_style"])
    model.load(checkpoint)
    return model


def call_of(tool: str, text: str) -> dict:
    """One generated call: the tool and its arguments, parsed, or their text when they do not parse."""
    parsed = parse_function_call(text)
    return {"name": tool, "arguments": text if parsed is None else parsed}


def answer(model, queries: Sequence[str], config: dict, batch_size: int, max_new_tokens: int) -> list[dict]:
    """Generate for every query in batches; one result per query: query, calls and raw text."""
    args = config["args"]
    max_length = args.get("max_length", 512) if args.get("query_cut", "head") == "head" else sys.maxsize
    encoded = [encode_sample({"user_input": q, "tools": [], "function_calls": []}, model.tokenizer,
                             model.encode_tool, max_length, "eval", prompt_format=args.get("prompt_format", "chat"))
               for q in queries]
    results = []
    for first in range(0, len(encoded), batch_size):
        chunk = encoded[first:first + batch_size]
        input_ids, mask = left_pad([item["input_ids"] for item in chunk], model.tokenizer.pad_token_id)
        with torch.no_grad():
            outputs = model.generate_with_tool_prediction(input_ids, mask, max_new_tokens)
        for item, out in zip(chunk, outputs):
            calls = [call_of(tool, call) for tool, call in zip(out.predicted_tools, out.function_calls)]
            results.append({"query": item["user_input"], "calls": calls, "text": out.text})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=logging.WARNING)
    config, finished = read_run(args.run_dir)
    checkpoint = checkpoint_of(args.run_dir, config, args.round, finished)
    model_name = backbone_of(config, args.model_name)
    queries = read_queries(args.queries, args.input)
    if not queries:
        raise UserError("no query given (as arguments, --input or stdin)")
    meta = checkpoint_meta(config, checkpoint)
    tools = offered_tools(config, meta, args.tools)
    model = load_model(config, meta, checkpoint, model_name, args.device,
                       args.dtype or config["args"].get("dtype", "auto"))
    if tools is not None:
        model.set_generation_tools(tools)
    max_new_tokens = args.max_new_tokens or config["args"].get("max_new_tokens", 256)
    for result in answer(model, queries, config, args.batch_size, max_new_tokens):
        print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
