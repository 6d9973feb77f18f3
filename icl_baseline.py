"""In-context baselines: the tools' descriptions sit in the prompt, all of them (ICL) or the top-k retrieved (RAG).

    python icl_baseline.py --test_data data/test/function_calling_test_tools1-20_3calls.json
    python icl_baseline.py --test_data data/test/function_calling_test_tools1-20_3calls.json --use_rag --retrieval_k 5

The frozen backbone reads the offered tools as JSON in the system turn of its chat template (dataset.tool_system_prompt)
and answers with one {"name", "arguments"} object per call (dataset.icl_answer_text, the format the tiny backbone was
pretrained on). The answer is parsed into calls, each call's tool is inferred (`infer_tool`), and the predictions are
scored with eval.score_predictions, so the numbers sit beside TokMem's and LoRA's. The prompt length per query is
reported for ICL, RAG and TokMem's description-free prompt: the context overhead that tool memory removes.

`--icl_shots N` puts N solved examples from the round's training file (the one of the test file's tool range) before
the query, as earlier user/assistant turns of the same chat template, each answer written as icl_answer_text writes it
(the format the system turn asks for); their tokens count in the prompt length. Which examples (`pick_shots`): the
training file's examples are shuffled once with --seed; each query takes the first N in that order whose tools are all
among the tools its prompt lists, then, when too few are, those sharing a tool with it, then any. Under ICL every
described tool is listed, so every query gets the same N; under RAG a query's examples call its retrieved tools where
the file has such examples.

The original toolkit's choices are flags: `--icl_prompt original` (its hand-written Llama-3 turns: the tools as
indented JSON with a `type` field, arguments-only answers, examples), `--icl_answer original` (its line-by-line
reading of the answer), `--retrieval_text original` (its RAG text). Its way of naming the tool of an in-context call
(`original_call_tool`) gives the paper_ tool scores. Several --test_data files are scored each as its own set.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

import distributed
from common import (
    CliParser,
    UserError,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    non_negative_int,
    positive_int,
    read_json,
    set_seed,
)
from dataset import build_prompt_ids, end_of_turn_id, icl_answer_text, load_samples, tool_system_prompt
from decoding import causal_lm_step, decode_prompts
from eval import format_metrics_table, parse_function_call, score_predictions
from experiment import DEFAULT_RUNS_ROOT, RunDirectory, claim_default_run_dir
from model import load_base_model, load_tokenizer, model_positions, resolve_device, resolve_dtype
import round_files
from settings import ModelSettings, add_model_flags, from_flags, resolve_model_name
from tool_retrieval import DEFAULT_ENCODER, RETRIEVAL_TEXTS, ToolRetriever, parameter_names, recall_at_k

logger = logging.getLogger("icl_baseline")

UNKNOWN_TOOL = "<unknown>"
ARGUMENT_FIELDS = ("arguments", "parameters")
_OPENING = re.compile(r"[\[{]")
_OBJECT_START = re.compile(r"\{\s*[\"']")  # a `{` that opens a JSON object or dict literal, not a prose `{name}`
_CALL_LINE = re.compile(r"\n[ \t]*\{")  # a line that starts with `{`: the next call of a one-per-line answer
_DECODER = json.JSONDecoder()
ICL_PROMPTS = ("toolkit", "original")
ICL_ANSWERS = ("toolkit", "original")
LLAMA3_TURN_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_ORIGINAL_CALL_FORM = re.compile(r"(\w+)\((.*)\)")
_ORIGINAL_CALL_NAME = re.compile(r"^(\w+)\s*\(")


@dataclass(frozen=True)
class EvaluatedSet:
    """A 'round' of an in-context run, for the run directory: one scored test set, named by tool range or file stem."""

    name: str


@dataclass
class TestSet:
    """One --test_data file, scored as its own set, and the training file its --icl_shots examples come from."""

    name: str
    path: Path
    samples: list[dict]
    shot_path: Path | None = None
    shot_pool: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class IclSettings:
    """An in-context run: its test files and their descriptions, the seeded subset, the prompt and how answers are
    read, the generation batch, and where the results go."""

    test_data: list[str] | None = None  # None: round_files.SINGLE_TEST_FILE
    tool_descriptions: list[str] | None = None
    max_samples: int | None = None
    batch_size: int = 8
    output: str | None = None
    seed: int = 42
    icl_prompt: str = "toolkit"
    icl_answer: str = "toolkit"
    icl_shots: int = 0


@dataclass(frozen=True)
class RetrievalSettings:
    """RAG: whether on, how many tools each prompt lists, the encoder, and the text it embeds per tool."""

    use_rag: bool = False
    retrieval_k: int = 5
    retriever_model: str = DEFAULT_ENCODER
    retrieval_text: str = "toolkit"


@dataclass
class IclInputs:
    """What an in-context run reads before the model: its test sets and the described tools."""

    test_paths: list[Path]
    description_paths: list[Path]
    descriptions: dict[str, dict]
    test_sets: list[TestSet]

    @property
    def samples(self) -> list[dict]:
        return [sample for test_set in self.test_sets for sample in test_set.samples]


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
    """The descriptions file paired with a test file (data/test/…tools1-20_3calls.json -> data/…tools1-20.json)."""
    parsed = round_files.parse_test_path(test_path)
    if parsed is None:
        raise UserError(f"cannot tell which tool descriptions go with {test_path}; pass --tool_descriptions")
    data_dir, start, end, _ = parsed
    return round_files.descriptions_path(data_dir, start, end)


def data_command_for(test_path: Path) -> str | None:
    """The xlam_datasets.py command that writes a round's test file and its descriptions; None for other names."""
    parsed = round_files.parse_test_path(test_path)
    if parsed is None:
        return None
    data_dir, start, end, calls = parsed
    return round_files.data_command(data_dir, start, end, test_calls=calls)


def require_file(path: Path, what: str, test_path: Path) -> None:
    """A missing input file is a one-line error naming it and, for round file names, the command that makes it."""
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


def load_test_sets(paths: Sequence[Path], descriptions: Mapping[str, dict], max_samples: int | None,
                   seed: int) -> list[TestSet]:
    """Read each test file as its own set; every gold tool must be described. `max_samples` keeps a seeded subset of
    each file, in file order."""
    sets = []
    for path, name in zip(paths, set_names(paths)):
        require_file(path, "data file", path)
        samples = load_samples(path)
        for index, sample in enumerate(samples):
            missing = [tool for tool in sample["tools"] if tool not in descriptions]
            if missing:
                raise UserError(f"test file {path}, row {index}: tool {missing[0]!r} has no description in "
                                "--tool_descriptions")
        if max_samples is not None and max_samples < len(samples):
            kept = sorted(random.Random(seed).sample(range(len(samples)), max_samples))
            samples = [samples[i] for i in kept]
        sets.append(TestSet(name, path, samples))
    return sets


def set_names(paths: Sequence[Path]) -> list[str]:
    """Each test file's set name: `1-20` for a round's test file (its tool range), else the file stem; files whose
    ranges coincide are named by their stems, and names that still coincide are a UserError."""
    parsed = [round_files.parse_test_path(path) for path in paths]
    ranges = [round_files.range_name(*p[1:3]) if p else path.stem for p, path in zip(parsed, paths)]
    names = [path.stem if ranges.count(short) > 1 else short for path, short in zip(paths, ranges)]
    for index, name in enumerate(names):
        if name in names[:index]:
            first = paths[names.index(name)]
            raise UserError(f"--test_data: {first} and {paths[index]} would both be reported as set {name!r}; "
                            "rename one of them")
    return names


def evaluated_set_name(paths: Sequence[Path]) -> str:
    """The names of the scored sets (`set_names`) joined with `+`."""
    return "+".join(set_names(paths))


# ----------------------------------------------------------------------------------------------------------------------
# Few-shot examples (--icl_shots)


def shots_path_for(test_path: Path) -> Path:
    """The training file of a round's test file: same data directory and tool range; of several (other call caps),
    the one with the test file's cap. A test file of another name, or a range without one, is a UserError."""
    parsed = round_files.parse_test_path(test_path)
    if parsed is None:
        raise UserError(f"--icl_shots: cannot tell which training file goes with {test_path}; the examples come from "
                        "the training file of a round's test file (test/function_calling_test_tools<start>-<end>_"
                        "<k>calls.json)")
    data_dir, start, end, calls = parsed
    found = round_files.train_paths_of_range(data_dir, start, end)
    same_cap = round_files.train_path(data_dir, start, end, calls)
    if not found:
        raise UserError(f"--icl_shots: training file not found: {same_cap} (no training file of tools "
                        f"{start}-{end}); make it with: {round_files.data_command(data_dir, start, end)}")
    if len(found) == 1:
        return found[0]
    if same_cap in found:
        return same_cap
    raise UserError(f"--icl_shots: {len(found)} training files of tools {start}-{end} ({', '.join(map(str, found))}) "
                    f"and none with the test file's {calls}-call cap; keep one")


def load_shot_pools(test_sets: Sequence[TestSet], descriptions: Mapping[str, dict], shots: int) -> None:
    """Give each test set its training file's examples whose tools are all described; a file with fewer than `shots`
    of them is a UserError."""
    for test_set in test_sets:
        path = shots_path_for(test_set.path)
        pool = [sample for sample in load_samples(path) if all(tool in descriptions for tool in sample["tools"])]
        if len(pool) < shots:
            raise UserError(f"--icl_shots {shots}: training file {path} has {len(pool)} examples whose tools are all "
                            "described; lower --icl_shots")
        test_set.shot_path, test_set.shot_pool = path, pool


def shot_order(size: int, seed: int) -> list[int]:
    """A seeded permutation of a pool's indices: the order examples are offered in."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order


def pick_shots(pool: Sequence[dict], order: Sequence[int], offered: Sequence[str], shots: int) -> list[dict]:
    """`shots` examples of `pool` in the seeded `order`: first those whose tools are all `offered`, then those
    sharing a tool with them, then any."""
    listed = set(offered)

    def tier(index: int) -> int:
        tools = set(pool[index]["tools"])
        return 0 if tools <= listed else 1 if tools & listed else 2

    return [pool[index] for index in sorted(order, key=tier)[:shots]]  # a stable sort: the seeded order within a tier


def choose_shots(test_sets: Sequence[TestSet], offered: Sequence[Sequence[str]], shots: int,
                 seed: int) -> list[list[dict]]:
    """Per query (test sets' samples in order), its examples from its set's pool (`pick_shots`); none when
    `shots` is 0."""
    chosen: list[list[dict]] = []
    for test_set in test_sets:
        order = shot_order(len(test_set.shot_pool), seed) if shots else []
        for _ in test_set.samples:
            index = len(chosen)
            chosen.append(pick_shots(test_set.shot_pool, order, offered[index], shots) if shots else [])
    return chosen


def shot_turns(shots: Sequence[dict]) -> list[tuple[str, str]]:
    """Examples as (user, assistant) exchanges, the answer written as the prompt asks (dataset.icl_answer_text)."""
    return [(shot["user_input"], icl_answer_text(shot["tools"], shot["function_calls"])) for shot in shots]


# ----------------------------------------------------------------------------------------------------------------------
# Answers: calls and their tools


def parse_answer(text: str) -> list[dict | str]:
    """The calls of a generated answer, in order: each parsed object, or the raw text of a call that does not parse.

    Every JSON object in the text is a call: one per line as the prompt asks, several on one line, one object
    pretty-printed over several lines, or a JSON list of objects. A `{` that starts no JSON object is read up to its
    matching `}`, or else up to the next line that starts with `{`, or else the end (`_fragment_end`), with
    eval.parse_function_call (a Python dict literal, say); failing that it is one unparseable call (a truncated
    answer, for instance: a truncated pretty-printed object is one call, not one per nested line). Text outside
    objects (prose, code fences) is ignored, and so is a `{` that does not start like an object (a quote after it):
    placeholders such as `{city}` in prose are no calls. An object that wraps its call as
    {"function": {"name", "arguments"}} (OpenAI's tool-call form) is that inner call.
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
        if text[start] == "[" or not _OBJECT_START.match(text, start):
            position = start + 1
            continue
        position = _fragment_end(text, start)
        parsed = parse_function_call(text[start:position])
        calls.append(parsed if parsed is not None else text[start:position].strip())
    return calls


def _fragment_end(text: str, start: int) -> int:
    """Where a `{` that starts no JSON object ends: after its matching `}` (quoted text skipped), else at the next line
    that starts with `{`, else at the end of the text."""
    next_line = _CALL_LINE.search(text, start + 1)
    limit = next_line.start() if next_line else len(text)
    depth, quote, escaped = 0, "", False
    for index in range(start, limit):
        char = text[index]
        if escaped:
            escaped = False
        elif quote:
            escaped = char == "\\"
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return limit


def _objects(value: object) -> list[dict]:
    """The call objects in a decoded JSON value: the object itself (its "function" when that is a named call object),
    or the objects of a list."""
    if isinstance(value, dict):
        inner = value.get("function")
        return [inner if isinstance(inner, dict) and isinstance(inner.get("name"), str) else value]
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


def original_answer_calls(text: str) -> list[dict | str]:
    """The calls of an answer as the original toolkit read them: every line that is JSON by itself is a call (a value
    that is no object stands as {"value": ...}), other lines are skipped; with no such line the whole answer is read
    as one JSON value (an object, or a list: one call per item); failing that the stripped answer is one unparseable
    call, returned as its text. An empty answer has no call."""
    stripped = text.strip()
    if not stripped:
        return []
    calls = []
    for line in stripped.split("\n"):
        if line.strip():
            try:
                calls.append(_original_call(json.loads(line.strip())))
            except (json.JSONDecodeError, RecursionError):
                continue
    if calls:
        return calls
    try:
        value = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return [stripped]
    if isinstance(value, list):
        return [_original_call(item) for item in value]
    return [value] if isinstance(value, dict) else []


def _original_call(value: object) -> dict:
    return value if isinstance(value, dict) else {"value": value}


def original_call_tool(call: str | dict) -> str | None:
    """The tool the original's in-context scoring saw in a call (argument JSON text, or a dict), None for none.

    A call parses as JSON, else as the text from its first `{` to its last `}`, else as `name(...)`. Of an object
    with one key, the tool is that key (so a one-argument call `{"city": "Paris"}` names the tool "city"); with more
    keys, the value of its "function" or else "name" field; otherwise none. The original applied this to the gold
    calls (arguments only) as well, so its in-context tool scores compare argument names, not tools.
    """
    if isinstance(call, dict):
        return _original_object_tool(call)
    text = call.strip() if isinstance(call, str) else ""
    braces = text[text.find("{"): text.rfind("}") + 1] if "{" in text and "}" in text else ""
    for candidate in (text, braces):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        return _original_object_tool(value) if isinstance(value, dict) else None
    match = _ORIGINAL_CALL_FORM.match(text) or _ORIGINAL_CALL_NAME.match(text)
    return match.group(1) if match else None


def _original_object_tool(value: dict) -> str | None:
    if len(value) == 1:
        name = next(iter(value))
    elif "function" in value:
        name = value["function"]
    elif "name" in value:
        name = value["name"]
    else:
        return None
    return name if isinstance(name, str) else json.dumps(name, sort_keys=True, ensure_ascii=False)


@dataclass
class ReadAnswer:
    """An answer read into calls: their tools (this toolkit's inference), arguments text, and the tools the original's
    rule names (`original_call_tool`; calls naming none are left out, as the original left them out)."""

    tools: list[str]
    calls: list[str]
    paper_tools: list[str]


def read_answer(text: str, descriptions: Mapping[str, dict], rule: str = "toolkit") -> ReadAnswer:
    """Read a generated answer with this toolkit's parser (`answer_to_calls`) or the original's
    (`original_answer_calls`: a call is the line's whole object; an unparseable answer is one call with text "",
    which every parser counts as a parse error, and names a tool only when it starts like `name(`)."""
    if rule == "toolkit":
        tools, calls = answer_to_calls(text, descriptions)
        return ReadAnswer(tools, calls, _named([original_call_tool(call) for call in calls]))
    tools, calls, paper = [], [], []
    for call in original_answer_calls(text):
        if isinstance(call, str):
            match = _ORIGINAL_CALL_NAME.match(call)
            tools.append(UNKNOWN_TOOL)
            calls.append("")
            paper.append(match.group(1) if match else None)
        else:
            tools.append(infer_tool(call, descriptions) or UNKNOWN_TOOL)
            calls.append(json.dumps(call, ensure_ascii=False))
            paper.append(original_call_tool(call))
    return ReadAnswer(tools, calls, _named(paper))


def _named(names: Sequence[str | None]) -> list[str]:
    return [name for name in names if name is not None]


def original_tool_scores(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """One answer's tool F1, precision and recall as the original's in-context baseline computed them: over the SETS
    of names; F1 1 when both are empty and 0 when one is; precision 0 with no predicted name, recall 1 with no gold
    name (so both empty give F1 1, precision 0, recall 1)."""
    out, target = set(predicted), set(gold)
    hits = len(out & target)
    precision = hits / len(out) if out else 0.0
    recall = hits / len(target) if target else 1.0
    if not out or not target:
        f1 = float(not out and not target)
    else:
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"paper_avg_tool_f1_score": f1, "paper_avg_tool_precision": precision, "paper_avg_tool_recall": recall}


def add_paper_tool_scores(metrics: dict, predictions: Sequence[dict]) -> dict:
    """Set the paper_ tool scores of `metrics`, overall and per number of gold calls, by the original's in-context
    rule (`original_call_tool` on predicted and gold calls, `original_tool_scores`), averaged over the answers."""
    def averaged(group: Sequence[dict]) -> dict[str, float]:
        scores = [original_tool_scores(p["paper_predicted_tools"], p["paper_gold_tools"]) for p in group]
        return {key: sum(score[key] for score in scores) / len(scores) for key in scores[0]}

    metrics.update(averaged(predictions))
    by_count: dict[str, list[dict]] = {}
    for prediction in predictions:
        by_count.setdefault(str(len(prediction["gold_calls"])), []).append(prediction)
    breakdown = metrics.setdefault("call_count_breakdown", {})
    for count, group in by_count.items():
        breakdown.setdefault(count, {}).update(averaged(group))
    return metrics


def icl_metrics(predictions: Sequence[dict]) -> dict:
    """eval.score_predictions, with the paper_ tool scores the original's in-context baseline gave."""
    return add_paper_tool_scores(score_predictions(predictions), predictions)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and generation


# The original's in-context prompt text (the model's input, so reproduced word for word under --icl_prompt original).
ORIGINAL_ROLE = ("You are a function calling assistant. Given a user query and available tools, determine which "
                 "functions to call and with what arguments.")
ORIGINAL_ANSWER_FORMAT = (
    "IMPORTANT: Output ONLY the function call arguments as JSON objects. For each function call needed, output the "
    "JSON arguments directly without any extra text, explanations, or formatting.",
    "",
    "Format: Output each function call as a separate JSON object on its own line:",
    '{"param1": "value1", "param2": "value2"}',
    '{"param1": "value3", "param2": "value4"}',
    "",
    "Examples:",
    '- For one function call: {"numbers": [5.5, 2.2, 9.9], "descending": false}',
    "- For multiple calls: ",
    '{"contingency_table": [[100, 150], [50, 100]], "significance_level": 0.01}',
    '{"contingency_table": [[200, 100], [150, 50]], "significance_level": 0.01}',
    '{"numbers": [5.5, 2.2, 9.9, 3.3, 7.7], "descending": false}',
)


def original_tool_listing(listing: Sequence[dict]) -> str:
    """The tools as the original's in-context prompt listed them: one JSON object keyed by tool name, indented by 2,
    non-ASCII escaped, each tool with name, description, parameters and type (missing ones empty, others dropped)."""
    tools = {desc["name"]: {"name": desc["name"], "description": desc.get("description", ""),
                            "parameters": desc.get("parameters", {}), "type": desc.get("type", "")}
             for desc in listing}
    return json.dumps(tools, indent=2)


def original_icl_prompt_text(user_input: str, listing: Sequence[dict]) -> str:
    """The original's in-context prompt, hand-written Llama-3 turns with no date line: a system turn (instructions,
    the tools, the answer format and examples, then a blank line), the user turn, and the assistant header."""
    system = "\n".join([ORIGINAL_ROLE, "", "Available Tools:", original_tool_listing(listing), "",
                        *ORIGINAL_ANSWER_FORMAT])
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{system}\n\n<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user_input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def check_icl_prompt(tokenizer, style: str) -> None:
    """The original prompt is written in Llama-3 turns: a tokenizer without their special tokens is a UserError."""
    if style != "original":
        return
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in LLAMA3_TURN_TOKENS if token not in vocabulary]
    if missing:
        raise UserError(f"--icl_prompt original writes Llama-3 turns, but the tokenizer has no {missing[0]} token; "
                        "use --icl_prompt toolkit (its chat template)")


def check_icl_shots(style: str, shots: int) -> None:
    """Examples are chat turns of the toolkit prompt; the original's hand-written prompt has none."""
    if shots and style == "original":
        raise UserError("--icl_shots needs --icl_prompt toolkit: the original's hand-written prompt has no example "
                        "turns")


def icl_prompt_ids(tokenizer, user_input: str, listing: Sequence[dict], style: str = "toolkit",
                   shots: Sequence[dict] = ()) -> list[int]:
    """The prompt listing the tools: this toolkit's chat template with the descriptions as JSON in the system turn and
    the `shots` examples as earlier turns, or the original's hand-written turns (`original_icl_prompt_text`, its own
    begin-of-text token and no other; no examples)."""
    if style == "original":
        check_icl_shots(style, len(shots))
        return tokenizer(original_icl_prompt_text(user_input, listing), add_special_tokens=False)["input_ids"]
    return build_prompt_ids(tokenizer, user_input, tool_system_prompt(listing), history=shot_turns(shots))


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
                   prompts: Sequence[list[int]], rag: bool, style: str = "toolkit",
                   icl_shots: Sequence[Sequence[dict]] | None = None) -> dict:
    """Prompt tokens per query for ICL (every tool listed), RAG (when run) and TokMem (no descriptions, no examples).

    `prompts` are the run's own prompts, examples included: RAG's when `rag`, else ICL's (the ICL prompts are then
    built here too, in the same `style`, with the examples ICL would take: `icl_shots` per query, default none).
    """
    icl_prompts = prompts
    if rag:
        listing = list(descriptions.values())
        shots = icl_shots if icl_shots is not None else [[] for _ in samples]
        icl_prompts = [icl_prompt_ids(tokenizer, sample["user_input"], listing, style, own)
                       for sample, own in zip(samples, shots)]
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


def generate_answers(model, tokenizer, prompts: Sequence[list[int]], batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers for token-id prompts (decoding.decode_prompts), each decoded up to its first stop token."""
    stops = _stop_ids(tokenizer)
    rows = decode_prompts(causal_lm_step(model), prompts, tokenizer.pad_token_id, batch_size, max_new_tokens, stops,
                          model.device, lambda chunks: tqdm(chunks, desc="generating", leave=False, dynamic_ncols=True,
                                                            disable=not distributed.is_main()))
    return [_decode_answer(tokenizer, row, stops) for row in rows]


def refuse_if_too_long(limit: int | None, prompts: Sequence[list[int]], max_new_tokens: int) -> None:
    """Prompts plus answers must fit the positions the model was built for (`limit`; None: no limit known)."""
    if not limit:
        return
    over = sum(len(ids) + max_new_tokens > limit for ids in prompts)
    if over:
        raise UserError(f"{over} of {len(prompts)} prompts (the longest {max(map(len, prompts))} tokens) plus "
                        f"--max_new_tokens {max_new_tokens} exceed the model's {limit} positions; offer fewer tools "
                        "(--use_rag) or lower --max_new_tokens")


# ----------------------------------------------------------------------------------------------------------------------
# The run


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test_data", action="append", default=None,
                        help="test file(s); repeat the flag or give a comma list: each file is scored as its own set "
                             "(named by its tool range, else its file stem), and all of them pooled (default: "
                             f"{round_files.SINGLE_TEST_FILE} in the working directory, as the original's)")
    parser.add_argument("--tool_descriptions", action="append", default=None,
                        help="descriptions file(s), repeatable or a comma list (default: the one each round's test file "
                             "pairs with, in its data directory: round_files.descriptions_path)")
    add_model_flags(parser)
    parser.add_argument("--max_samples", type=positive_int, default=None,
                        help="score a seeded subset of this size of each test file (default: every sample)")
    parser.add_argument("--batch_size", type=positive_int, default=IclSettings.batch_size,
                        help="prompts per generation batch")
    parser.add_argument("--output", default=None,
                        help="a run directory, or a results file when it ends in .json (default: runs/<method>_<time>)")
    parser.add_argument("--seed", type=int, default=IclSettings.seed,
                        help="seed of the --max_samples subset (decoding is greedy)")
    parser.add_argument("--use_rag", action="store_true", help="list only the top --retrieval_k retrieved tools")
    parser.add_argument("--retrieval_k", type=positive_int, default=RetrievalSettings.retrieval_k,
                        help="tools listed per query with --use_rag")
    parser.add_argument("--retriever_model", default=RetrievalSettings.retriever_model,
                        help="sentence-transformers encoder for --use_rag")
    parser.add_argument("--retrieval_text", choices=tuple(RETRIEVAL_TEXTS), default=RetrievalSettings.retrieval_text,
                        help="text embedded per tool for RAG: toolkit (readable name, description, parameters with "
                             "their descriptions) or original ('name description Parameters: a, b a: about-a')")
    parser.add_argument("--icl_prompt", choices=ICL_PROMPTS, default=IclSettings.icl_prompt,
                        help="toolkit: the chat template, tools as compact JSON, one {name, arguments} object per "
                             "call; original: the original's hand-written Llama-3 turns, tools as indented JSON with a "
                             "type field, one arguments object per line, with examples")
    parser.add_argument("--icl_shots", type=non_negative_int, default=IclSettings.icl_shots,
                        help="solved examples before each query, from the training file of the test file's tool "
                             "range, as earlier chat turns (picked with --seed; under RAG, examples of the retrieved "
                             "tools first); --icl_prompt toolkit only")
    parser.add_argument("--icl_answer", choices=ICL_ANSWERS, default=IclSettings.icl_answer,
                        help="how an answer is read into calls: toolkit (every JSON object or dict literal in it) or "
                             "original (each line that is JSON by itself, else the whole answer)")
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


def output_place(output: str | None) -> Path | None:
    """--output checked before any work (none or empty: a new runs/<method>_<timestamp>, whose root must be
    writable, and None is returned)."""
    if not output:
        check_writable(DEFAULT_RUNS_ROOT, "--output (default: runs/<method>_<timestamp>)")
        return None
    place = Path(output)
    check_output(place)
    check_writable(place, "--output", "file" if place.suffix == ".json" else "dir")
    return place


def read_inputs(icl: IclSettings) -> IclInputs:
    """The test files and their descriptions (given, or the ones each round's test file pairs with), checked."""
    test_paths = split_paths(icl.test_data or [round_files.SINGLE_TEST_FILE])
    if not test_paths:
        raise UserError("--test_data names no file")
    for path in test_paths:
        require_file(path, "data file", path)
    description_paths = split_paths(icl.tool_descriptions)
    if not description_paths:
        for path in test_paths:
            require_file(descriptions_path_for(path), "tool descriptions file", path)
        description_paths = split_paths([str(descriptions_path_for(path)) for path in test_paths])
    descriptions = load_descriptions(description_paths)
    test_sets = load_test_sets(test_paths, descriptions, icl.max_samples, icl.seed)
    if icl.icl_shots:
        load_shot_pools(test_sets, descriptions, icl.icl_shots)
    return IclInputs(test_paths, description_paths, descriptions, test_sets)


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
                    offered: Sequence[list[str]] | None, prompts: Sequence[list[int]],
                    answer_rule: str = "toolkit") -> list[dict]:
    """The prediction dicts of eval.score_predictions, with the answer text, prompt length, offered tools and the
    tools the original's rule names in the predicted and gold calls (paper_predicted_tools, paper_gold_tools)."""
    predictions = []
    for index, (sample, answer) in enumerate(zip(samples, answers)):
        read = read_answer(answer, descriptions, answer_rule)
        prediction = {"user_input": sample["user_input"], "predicted_tools": read.tools, "function_calls": read.calls,
                      "gold_tools": sample["tools"], "gold_calls": sample["function_calls"],
                      "generated_text": answer, "prompt_tokens": len(prompts[index]),
                      "paper_predicted_tools": read.paper_tools,
                      "paper_gold_tools": _named([original_call_tool(call) for call in sample["function_calls"]])}
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


def write_run_directory(output: Path, method: str, flags: Mapping[str, object], started: float, results: dict,
                        predictions: Sequence[dict], num_parameters: int) -> None:
    """config.json, metrics.jsonl, predictions.jsonl, results.json and summary.json (docs/DESIGN.md): each test set
    is a column of the matrices, scored in their last row (a frozen model has no rounds to forget across)."""
    names = list(results["sets"])
    run = RunDirectory(output, method, flags, [EvaluatedSet(name) for name in names], resume=False)
    run.started = started
    last = len(names) - 1
    for column, name in enumerate(names):
        run.add_metrics(last, column, results["sets"][name]["metrics"], "predicted")
    run.finish_round(last, {"prompt_tokens": results["prompt_tokens"]})
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
    distributed.setup_process_logging()
    icl, retrieval = from_flags(IclSettings, args), from_flags(RetrievalSettings, args)
    model_settings = from_flags(ModelSettings, args)
    method = "icl_rag" if retrieval.use_rag else "icl"
    check_icl_shots(icl.icl_prompt, icl.icl_shots)
    output = output_place(icl.output)
    set_seed(icl.seed)
    inputs = read_inputs(icl)
    samples, descriptions = inputs.samples, inputs.descriptions
    model_name = resolve_model_name(model_settings.model_name)
    positions = model_positions(model_name)
    device = distributed.init_from_env(resolve_device(model_settings.device))
    tokenizer = load_tokenizer(model_name)
    check_icl_prompt(tokenizer, icl.icl_prompt)
    retriever = None
    if retrieval.use_rag:
        retriever = ToolRetriever(descriptions, retrieval.retriever_model, device=device.type,
                                  text_style=retrieval.retrieval_text)
    offered = offered_tools(samples, descriptions, retriever, retrieval.retrieval_k)
    shots = choose_shots(inputs.test_sets, offered, icl.icl_shots, icl.seed)
    prompts = [icl_prompt_ids(tokenizer, sample["user_input"], [descriptions[name] for name in names], icl.icl_prompt,
                              own) for sample, names, own in zip(samples, offered, shots)]
    refuse_if_too_long(positions, prompts, model_settings.max_new_tokens)
    model = load_base_model(model_name, device, resolve_dtype(model_settings.dtype, device))
    if model_settings.shard_backbone:
        distributed.shard_backbone(model)
    if output is None:
        output = distributed.from_main(lambda: claim_default_run_dir(method))
    if output.suffix != ".json":
        distributed.setup_process_logging(output / "icl_baseline.log")
    logger.info("%s on %d test samples, %d described tools, model %s", method, len(samples), len(descriptions),
                model_name)
    generation_start = time.time()
    answers = generate_answers(model, tokenizer, prompts, icl.batch_size, model_settings.max_new_tokens)
    generation_seconds = time.time() - generation_start
    predictions = predictions_for(samples, answers, descriptions, offered if retrieval.use_rag else None, prompts,
                                  icl.icl_answer)
    results = {
        "method": method,
        "model_name": model_name,
        "evaluated": evaluated_set_name(inputs.test_paths),
        "test_data": [str(p) for p in inputs.test_paths],
        "tool_descriptions": [str(p) for p in inputs.description_paths],
        "num_tools": len(descriptions),
        "icl_prompt": icl.icl_prompt,
        "icl_answer": icl.icl_answer,
        "icl_shots": icl.icl_shots,
        "shots_data": [str(s.shot_path) for s in inputs.test_sets if s.shot_path is not None],
        "metrics": icl_metrics(predictions),
        "sets": per_set_results(inputs.test_sets, predictions),
        "prompt_tokens": prompt_lengths(tokenizer, samples, descriptions, prompts, retrieval.use_rag, icl.icl_prompt,
                                        choose_shots(inputs.test_sets, [list(descriptions)] * len(samples),
                                                     icl.icl_shots, icl.seed)),
        "generation_seconds": round(generation_seconds, 1),
    }
    if retriever is not None:
        results["retrieval"] = retrieval_report(retriever, samples, offered, retrieval.retrieval_k,
                                                retrieval.retriever_model)
        results["retrieval"]["text"] = retrieval.retrieval_text
    results["wall_seconds"] = round(time.time() - started, 1)
    if not distributed.is_main():
        return 0
    if output.suffix == ".json":
        atomic_write_json(output, {**results, "predictions": predictions})
    else:
        num_parameters = sum(p.numel() for p in model.parameters())
        write_run_directory(output, method, vars(args), started, results, predictions, num_parameters)
    print_report(results, output, retrieval.retrieval_k if retrieval.use_rag else None)
    return 0


def per_set_results(test_sets: Sequence[TestSet], predictions: Sequence[dict]) -> dict[str, dict]:
    """Each test set's file and scores, by set name; `predictions` follow the sets' samples in order (each gains its
    set's name as "test_set")."""
    sets, start = {}, 0
    for test_set in test_sets:
        own = predictions[start:start + len(test_set.samples)]
        start += len(test_set.samples)
        for prediction in own:
            prediction["test_set"] = test_set.name
        sets[test_set.name] = {"test_data": str(test_set.path), "metrics": icl_metrics(own)}
    return sets


def print_report(results: dict, output: Path, k: int | None) -> None:
    """The CLI's final tables: scores (per test set, then pooled, when several), prompt tokens and retrieval recall."""
    sets = results["sets"]
    if len(sets) > 1:
        for name, scored in sets.items():
            print(f"{results['method']} on test set {name} ({scored['test_data']}):")
            print(format_metrics_table(scored["metrics"]))
            print()
        print(f"{results['method']} on all {len(sets)} test sets pooled ({results['num_tools']} described tools):")
    else:
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
    distributed.run_cli(main)
