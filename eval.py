"""Scoring of generated function calls: parsing, normalization and the multiset scores of docs/DESIGN.md.

A call in this toolkit is a tool name plus an arguments object. The generator emits the tool (as a tool token) and
then the arguments as text; this module parses that text, puts it in a canonical form, and compares the multiset of
predicted calls with the multiset of gold calls (a call made twice counts twice; `3` equals `3.0`; key order and
whitespace do not matter).

Beside these, `score_predictions` reports the original toolkit's way of scoring under the same names prefixed
`paper_` (docs/reference.md, "Scores", and docs/paper.md's departures): sets instead of multisets, calls compared as
argument JSON without the tool and without number canonicalisation, parse errors counted over samples. Those are the numbers the paper's tables hold.

Run as a script to score a JSON list of predictions, or a run's prediction file (JSON Lines, one sample a line:
`predictions/round_R_test_C.jsonl` in a run directory), to the numbers the run reported:

    python eval.py --predictions runs/tokmem_X/predictions/round_2_test_1-10.jsonl [--output metrics.json]
"""

from __future__ import annotations

import ast
import itertools
import json
import logging
import math
import re
from collections import Counter
from typing import Any, Hashable, Iterable, NamedTuple, Sequence

from common import CliParser, UserError, atomic_write_json, read_json, run_cli, setup_logging

logger = logging.getLogger(__name__)

PREDICTION_FIELDS = ("predicted_tools", "function_calls", "gold_tools", "gold_calls")

TABLE_ROWS = (
    "total_examples",
    "exact_accuracy",
    "tool_accuracy",
    "avg_tool_f1_score",
    "avg_tool_precision",
    "avg_tool_recall",
    "avg_f1_score",
    "avg_precision",
    "avg_recall",
    "parse_error_rate",
)
PAPER_PREFIX = "paper_"
# The table's scores less the count and tool accuracy, by the paper's rules.
PAPER_METRICS = tuple(PAPER_PREFIX + name for name in TABLE_ROWS if name not in ("total_examples", "tool_accuracy"))

_CODE_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)
_CALL_START = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)\s*\(")
_JSON_LITERAL_NAMES = {"true": True, "false": False, "null": None, "none": None}


# ----------------------------------------------------------------------------------------------------------------------
# Parsing


def _balanced_end(text: str, start: int, open_char: str, close_char: str) -> int | None:
    """Index one past the bracket that closes `text[start]`, skipping quoted strings; None when never closed."""
    depth = 0
    quote: str | None = None
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == open_char:
            depth += 1
        elif char == close_char:
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _is_json_value(value: Any) -> bool:
    """True when `value` is made only of JSON types (dicts with string keys, lists, str, numbers, bool, None)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json_value(item) for key, item in value.items())
    return False


def _parse_object_at(text: str, start: int) -> tuple[dict | None, int | None]:
    """Parse the balanced `{...}` at `text[start]` as JSON, else as a Python dict literal; also where it ends."""
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except (json.JSONDecodeError, RecursionError):
        value, end = None, None
    if isinstance(value, dict):
        return value, end
    end = _balanced_end(text, start, "{", "}")
    if end is None:
        return None, None
    try:
        value = ast.literal_eval(text[start:end])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None, end
    return (value if isinstance(value, dict) and _is_json_value(value) else None), end


def _literal_argument(node: ast.expr) -> Any:
    """The value of one keyword argument of a call: a Python literal, or a bare true/false/null."""
    if isinstance(node, ast.Name) and node.id.lower() in _JSON_LITERAL_NAMES:
        return _JSON_LITERAL_NAMES[node.id.lower()]
    return ast.literal_eval(node)


def _parse_call_at(text: str, match: re.Match) -> tuple[dict | None, int | None]:
    """Parse `name(k=v, ...)` whose name starts at `match` (keyword arguments only); the arguments and the end."""
    open_paren = match.end() - 1
    end = _balanced_end(text, open_paren, "(", ")")
    if end is None:
        return None, None
    try:
        tree = ast.parse("_call" + text[open_paren:end], mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None, end
    call = tree.body
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        return None, end
    try:
        arguments = {kw.arg: _literal_argument(kw.value) for kw in call.keywords}
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None, end
    return (arguments if _is_json_value(arguments) else None), end


def _first_embedded(text: str) -> dict | None:
    """The first object or keyword call in `text` that parses, scanning by start position.

    A candidate that fails hides what lies inside it: garbage around a valid inner object is not a call, and an
    object left unclosed (a truncated generation) hides the rest of the text.
    """
    starts: list[tuple[int, bool, re.Match | None]] = [(i, True, None) for i, c in enumerate(text) if c == "{"]
    starts += [(match.start(), False, match) for match in _CALL_START.finditer(text)]
    starts.sort(key=lambda item: item[0])
    hidden_until = 0
    for start, is_object, match in starts:
        if start < hidden_until:
            continue
        if is_object:
            value, end = _parse_object_at(text, start)
            fail_end = len(text) if end is None else end
        else:
            value, end = _parse_call_at(text, match)
            fail_end = start if end is None else end
        if value is not None:
            return value
        hidden_until = fail_end
    return None


def parse_function_call(text: str | dict | None) -> dict | None:
    """Parse generated arguments text into a dict; None when nothing parseable is found.

    Accepted, in this order: a whole JSON object (a surrounding Markdown code fence is removed); otherwise the first
    balanced object found in the text (JSON, or a Python dict literal); or a call `name(k=v, k2="s")`, whichever starts
    first. For the call form the ARGUMENTS dict `{"k": v, "k2": "s"}` is returned (the tool name is carried separately
    in this toolkit), with bare true/false/null read as JSON literals; positional arguments make it unparseable.
    A dict is returned unchanged; any other non-string gives None.
    """
    if isinstance(text, dict):
        return text
    if not isinstance(text, str):
        return None
    stripped = text.strip()
    fenced = _CODE_FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    if not stripped:
        return None
    try:
        value = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        value = None
    if isinstance(value, dict):
        return value
    return _first_embedded(stripped)


# ----------------------------------------------------------------------------------------------------------------------
# Normalization


def _canonical_value(value: Any) -> Any:
    """A value in canonical form: integral floats become ints, strings lose outer whitespace, recursively."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {str(key): _canonical_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(item) for item in value]
    return value


def normalize_call(call: str | dict | None) -> str | None:
    """Canonical string of a call's arguments (a dict, or text that `parse_function_call` reads); None if unparseable.

    Keys are sorted, separators fixed, integral floats written as ints (so 3.0 == 3), string values stripped of outer
    whitespace, nested dicts and lists normalized recursively. Strings and numbers stay distinct ("3" != 3).
    """
    parsed = parse_function_call(call)
    if parsed is None:
        return None
    try:
        return json.dumps(_canonical_value(parsed), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Scores


def calculate_f1_score(outputs: Iterable[Hashable], targets: Iterable[Hashable]) -> dict[str, float]:
    """F1, precision and recall of `outputs` against `targets`, both taken as multisets.

    Conventions: both empty -> 1/1/1 (nothing to find, nothing wrongly found); exactly one side empty -> 0/0/0
    (an empty prediction for non-empty gold has precision 0, as does a non-empty prediction for empty gold).
    """
    output_counts = Counter(outputs)
    target_counts = Counter(targets)
    matched = sum((output_counts & target_counts).values())
    return _prf(matched, sum(output_counts.values()), sum(target_counts.values()))


def _prf(matched: int, n_output: int, n_target: int) -> dict[str, float]:
    """Precision, recall and F1 from counts, with the empty-side conventions of `calculate_f1_score`."""
    if n_output == 0 and n_target == 0:
        return {"f1_score": 1.0, "precision": 1.0, "recall": 1.0}
    if n_output == 0 or n_target == 0:
        return {"f1_score": 0.0, "precision": 0.0, "recall": 0.0}
    precision = matched / n_output
    recall = matched / n_target
    f1 = 2 * precision * recall / (precision + recall) if matched else 0.0
    return {"f1_score": f1, "precision": precision, "recall": recall}


class _Unparseable:
    """Stands for one predicted call that could not be parsed: equal only to itself, so it never matches gold."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        return f"<unparseable {self.raw!r}>"


def _gold_key(call: Any, where: str) -> str:
    """Normalized gold call; a gold call that does not parse is bad input."""
    normalized = normalize_call(call)
    if normalized is None:
        raise UserError(f"{where}: gold call {call!r} is not a JSON object of arguments")
    return normalized


# ----------------------------------------------------------------------------------------------------------------------
# The original toolkit's scores (the paper_ metrics)

# The original toolkit reads a call in two steps, reproduced here from its behaviour (docs/reference.md, "Scores"):
# parse the text into a Python value, then turn that value into the string that sets, sorts and exact match compare.
# Strings from different routes (JSON, a call through `ast`, collapsed raw text) are compared as plain strings, as the
# original compares them, so they can meet.
_PAPER_CALL_TEXT = re.compile(r"(\w+)\((.*)\)")


class PaperCall(NamedTuple):
    """One call as the original scores it: the string it compares, whether it counts as a parse error, and whether
    the original's scorer raises on it (its bug: the rest of that batch then scores 0; here it is a parse error)."""

    key: str
    parse_error: bool
    crashes_original: bool = False


class _RawText(str):
    """Text the original could not parse (its `{'raw_text': ..., 'parse_error': True}`)."""


def _paper_parse(call: Any) -> Any:
    """The value the original reads from a call: a dict as is; text as JSON (any JSON value), else the JSON object
    between the first `{` and the last `}`, else a `name(key=value, ...)` form split at every comma, else _RawText."""
    if isinstance(call, dict):
        return call
    if not isinstance(call, str) or not call:
        return _RawText(str(call))
    text = call.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "{" in text and "}" in text:
        try:
            return json.loads(text[text.find("{"):text.rfind("}") + 1])
        except json.JSONDecodeError:
            pass
    match = _PAPER_CALL_TEXT.match(text)
    if match:
        name, arguments = match.groups()
        try:
            parsed = {}
            if arguments.strip():
                for part in arguments.split(","):
                    if "=" in part:
                        key, value = (piece.strip() for piece in part.split("=", 1))
                        try:
                            parsed[key] = ast.literal_eval(value)
                        except (ValueError, SyntaxError):
                            parsed[key] = value
            return {name: parsed}
        except Exception:  # noqa: BLE001 - the original falls back to raw text on any failure here
            pass
    return _RawText(text)


def _paper_raw_key(text: str) -> str:
    """Raw text as the original normalises it: re-dumped when it is JSON, else whitespace runs made one space."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return re.sub(r"\s+", " ", text.strip())


def _paper_value_key(value: Any) -> str:
    """A parsed value as the original normalises it. A one-key object whose value is an object is the call
    `key(k=v, ...)` through `ast` (keys sorted, values by `repr`, so nested key order counts and `3.0` != `3`);
    anything else is sorted-key compact JSON (`str` where JSON cannot hold it)."""
    if len(value) == 1:
        name, params = next(iter(value.items()))
        if isinstance(params, dict):
            source = f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(params.items()))})"
            try:
                return ast.dump(ast.parse(source).body[0].value, annotate_fields=False, include_attributes=False)
            except Exception:  # noqa: BLE001 - the original falls back to JSON on any failure here
                pass
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(value)


def paper_call(call: Any) -> PaperCall:
    """One call as the original toolkit scores it (see `_paper_parse` and `_paper_value_key`).

    A parse error is raw text or an object with a `parse_error` key (one with only a `raw_text` key is compared as
    its raw text but not counted). JSON that is not an object is no parse error
    (`[1, 2]` and `": "` are compared as their JSON), except where the original's scorer raises: a number, `null`,
    a boolean, a one-element list, a one-character string, or a string or list holding `parse_error` or `raw_text`.
    Those are parse errors here, flagged `crashes_original`.
    """
    parsed = _paper_parse(call)
    if isinstance(parsed, _RawText):
        return PaperCall(_paper_raw_key(parsed), True)
    if isinstance(parsed, dict):
        if "parse_error" in parsed or "raw_text" in parsed:
            raw = parsed.get("raw_text", str(parsed))
            if not isinstance(raw, str):
                return PaperCall(_paper_raw_key(str(raw)), True, True)
            return PaperCall(_paper_raw_key(raw), "parse_error" in parsed)
        return PaperCall(_paper_value_key(parsed), False)
    crashes = (not isinstance(parsed, (list, str)) or len(parsed) == 1
               or "parse_error" in parsed or "raw_text" in parsed)
    if crashes:
        return PaperCall(_paper_raw_key(call if isinstance(call, str) else str(call)), True, True)
    return PaperCall(json.dumps(parsed, sort_keys=True, separators=(",", ":")), False)


def calculate_set_f1_score(outputs: Iterable[Hashable], targets: Iterable[Hashable]) -> dict[str, float]:
    """F1, precision and recall of `outputs` against `targets` taken as SETS (the original's rule: duplicates count
    once); the empty-side conventions are those of `calculate_f1_score`."""
    output_set, target_set = set(outputs), set(targets)
    return _prf(len(output_set & target_set), len(output_set), len(target_set))


def _paper_sample_scores(predicted_tools: list[str], predicted_calls: list[Any], gold_tools: list[str],
                         gold_calls: list[Any], untooled_text: str | None = None) -> dict[str, float | int]:
    """Per-sample scores under the original's rules: the paper_ counterparts of `_sample_scores`. An answer with no
    tool token is one call holding its whole text (`untooled_text`), as the original scores it."""
    if not predicted_tools and not predicted_calls and untooled_text:
        predicted_calls = [untooled_text]
    predicted = [paper_call(call) for call in predicted_calls]
    gold = [paper_call(call).key for call in gold_calls]
    keys = [call.key for call in predicted]
    calls = calculate_set_f1_score(keys, gold)
    tools = calculate_set_f1_score(predicted_tools, gold_tools)
    return {
        "paper_exact": float(sorted(keys) == sorted(gold)),
        "paper_f1_score": calls["f1_score"],
        "paper_precision": calls["precision"],
        "paper_recall": calls["recall"],
        "paper_tool_f1_score": tools["f1_score"],
        "paper_tool_precision": tools["precision"],
        "paper_tool_recall": tools["recall"],
        "n_paper_parse_errors": sum(call.parse_error for call in predicted),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Scoring a list of predictions


def _require_list(prediction: dict, name: str, where: str) -> list:
    """The field `name` of a prediction, which must be a list."""
    if name not in prediction:
        raise UserError(f"{where}: missing field {name!r} (expected {', '.join(PREDICTION_FIELDS)})")
    value = prediction[name]
    if not isinstance(value, list):
        raise UserError(f"{where}: field {name!r} must be a list, got {type(value).__name__}")
    return value


def _sample_scores(prediction: Any, index: int, strict: bool = False) -> dict[str, float | int]:
    """Per-sample scores of one prediction (see `score_predictions`)."""
    where = f"prediction {index}"
    if not isinstance(prediction, dict):
        raise UserError(f"{where}: expected an object with fields {', '.join(PREDICTION_FIELDS)}")
    predicted_tools, function_calls, gold_tools, gold_calls = (
        _require_list(prediction, name, where) for name in PREDICTION_FIELDS
    )
    if len(gold_tools) != len(gold_calls):
        raise UserError(
            f"{where}: 'gold_tools' has {len(gold_tools)} entries but 'gold_calls' has {len(gold_calls)}"
        )
    for field_name, names in (("predicted_tools", predicted_tools), ("gold_tools", gold_tools)):
        for name in names:
            if not isinstance(name, str):
                raise UserError(f"{where}: {field_name!r} must hold tool names (strings), got {name!r}")
    if len(predicted_tools) != len(function_calls) and strict:
        raise UserError(f"{where}: 'predicted_tools' has {len(predicted_tools)} entries but 'function_calls' has "
                        f"{len(function_calls)}")
    if len(predicted_tools) != len(function_calls):
        logger.warning(
            "%s: %d predicted tools but %d generated calls; a tool without a call counts as an unparseable call",
            where, len(predicted_tools), len(function_calls),
        )
    predicted = list(itertools.zip_longest(predicted_tools, function_calls))
    predicted_keys = [(tool, normalize_call(call) or _Unparseable(call)) for tool, call in predicted]
    gold_keys = [
        (tool, _gold_key(call, f"{where}, gold call {position}"))
        for position, (tool, call) in enumerate(zip(gold_tools, gold_calls))
    ]
    calls = calculate_f1_score(predicted_keys, gold_keys)
    tool_scores = calculate_f1_score(predicted_tools, gold_tools)
    return {
        "n_gold_calls": len(gold_calls),
        "exact": float(Counter(predicted_keys) == Counter(gold_keys)),
        "tool_exact": float(Counter(predicted_tools) == Counter(gold_tools)),
        "f1_score": calls["f1_score"],
        "precision": calls["precision"],
        "recall": calls["recall"],
        "tool_f1_score": tool_scores["f1_score"],
        "tool_precision": tool_scores["precision"],
        "tool_recall": tool_scores["recall"],
        "n_predicted_calls": len(predicted_keys),
        "n_parse_errors": sum(isinstance(key, _Unparseable) for _, key in predicted_keys),
        **_paper_sample_scores(predicted_tools, [call for _, call in predicted], gold_tools, gold_calls,
                               prediction.get("untooled_text")),
    }


# metric name -> per-sample key whose mean it is
_AVERAGED = {
    "exact_accuracy": "exact",
    "tool_accuracy": "tool_exact",
    "avg_f1_score": "f1_score",
    "avg_precision": "precision",
    "avg_recall": "recall",
    "avg_tool_f1_score": "tool_f1_score",
    "avg_tool_precision": "tool_precision",
    "avg_tool_recall": "tool_recall",
    "paper_exact_accuracy": "paper_exact",
    "paper_avg_f1_score": "paper_f1_score",
    "paper_avg_precision": "paper_precision",
    "paper_avg_recall": "paper_recall",
    "paper_avg_tool_f1_score": "paper_tool_f1_score",
    "paper_avg_tool_precision": "paper_tool_precision",
    "paper_avg_tool_recall": "paper_tool_recall",
}


def _mean(values: list[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


def _aggregate(samples: list[dict[str, float | int]]) -> dict[str, float | int | None]:
    """The metric dict of docs/DESIGN.md and its paper_ counterparts (without the breakdown) over per-sample scores.

    Both parse-error rates are None (absent, not perfect) for a group in which no call was predicted.
    """
    n_predicted = sum(sample["n_predicted_calls"] for sample in samples)
    n_errors = sum(sample["n_parse_errors"] for sample in samples)
    n_paper_errors = sum(sample["n_paper_parse_errors"] for sample in samples)
    metrics: dict[str, float | int | None] = {
        name: _mean([s[key] for s in samples]) for name, key in _AVERAGED.items()
    }
    metrics["parse_error_rate"] = n_errors / n_predicted if n_predicted else None
    metrics["paper_parse_error_rate"] = n_paper_errors / len(samples)
    metrics["total_examples"] = len(samples)
    return metrics


def score_predictions(predictions: Sequence[dict], strict: bool = False) -> dict[str, Any]:
    """Score a list of predictions into the metric dict of docs/DESIGN.md, overall and per number of gold calls.

    Each prediction is {"predicted_tools": [name, ...], "function_calls": [raw arguments text, ...],
    "gold_tools": [name, ...], "gold_calls": [arguments JSON, ...]}. A call is the pair (tool, normalized arguments).
    Every avg_* is a mean of per-sample values; parse_error_rate is unparseable predicted calls over all predicted
    calls. The paper_* metrics score the same predictions by the original toolkit's rules (`paper_call_key`, sets;
    paper_parse_error_rate is over samples). A group with no predicted call has both parse-error rates None.
    An empty list, a missing field or an unparseable gold call is a UserError. A model's own predictions may hold a
    tool whose call was cut off (a warning, scored as an unparseable call); `strict` (a predictions file given to the
    CLI) refuses predicted fields of different lengths as it does gold ones.
    """
    if not isinstance(predictions, (list, tuple)):
        raise UserError(f"predictions must be a list, got {type(predictions).__name__}")
    if not predictions:
        raise UserError("no predictions to score")
    samples = [_sample_scores(prediction, index, strict) for index, prediction in enumerate(predictions)]
    metrics: dict[str, Any] = _aggregate(samples)
    by_count: dict[int, list[dict[str, float | int]]] = {}
    for sample in samples:
        by_count.setdefault(int(sample["n_gold_calls"]), []).append(sample)
    metrics["call_count_breakdown"] = {str(count): _aggregate(by_count[count]) for count in sorted(by_count)}
    return metrics


def _table_cell(values: dict[str, Any], row: str) -> str:
    """One cell: `-` for a metric the dict lacks, `n/a` for one reported as absent (None), else the number."""
    if row not in values:
        return "-"
    value = values[row]
    if value is None:
        return "n/a"
    return f"{int(value)}" if row == "total_examples" else f"{value:.4f}"


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per metric, one column overall and one per number of gold calls; the paper_ rows
    (the original toolkit's scoring) follow under their own heading."""
    breakdown = metrics.get("call_count_breakdown", {})
    columns = [("overall", metrics)] + [(f"{count} call{'s' if count != '1' else ''}", breakdown[count])
                                         for count in breakdown]
    width = max(len(row) for row in TABLE_ROWS + PAPER_METRICS) + 2
    header = "metric".ljust(width) + "".join(name.rjust(12) for name, _ in columns)
    lines = [header, "-" * len(header)]
    for row in TABLE_ROWS:
        lines.append(row.ljust(width) + "".join(_table_cell(values, row).rjust(12) for _, values in columns))
    if any(row in metrics for row in PAPER_METRICS):
        lines.append("paper scoring (the original toolkit's rules: sets, arguments only, exact numbers)")
        for row in PAPER_METRICS:
            lines.append(row.ljust(width) + "".join(_table_cell(values, row).rjust(12) for _, values in columns))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> CliParser:
    parser = CliParser(description="Score generated function calls against gold calls (metrics of docs/DESIGN.md).")
    parser.add_argument("--predictions", required=True, help="JSON list of {predicted_tools, function_calls, "
                        "gold_tools, gold_calls}, or a .jsonl file of them (a run's predictions/ files) (required, "
                        "no default)")
    parser.add_argument("--output", help="where to write the metrics JSON (default: none, the table is printed only)")
    return parser


def read_predictions(path: str) -> list:
    """A predictions file: a JSON list, or JSON Lines (a `.jsonl` name: one prediction object per line, as a run's
    predictions/ folder holds them); anything else is a UserError naming the file (and line)."""
    if not path.endswith(".jsonl"):
        predictions = read_json(path, what="predictions file")
        if not isinstance(predictions, list):
            raise UserError(f"predictions file {path} must hold a JSON list, got {type(predictions).__name__}")
        return predictions
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"predictions file {path} cannot be read ({getattr(err, 'strerror', None) or err})") from None
    predictions = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                predictions.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"predictions file {path}, line {number}: not valid JSON ({err.msg})") from None
    return predictions


def main(argv: Sequence[str] | None = None) -> int:
    """Score a JSON list (or JSON Lines file) of predictions; print the table and optionally write the metrics."""
    args = build_parser().parse_args(argv)
    setup_logging()
    predictions = read_predictions(args.predictions)
    try:
        metrics = score_predictions(predictions, strict=True)
    except UserError as err:
        raise UserError(f"predictions file {args.predictions}: {err}") from None
    if args.output:
        atomic_write_json(args.output, metrics)
        logger.info("wrote %s", args.output)
    print(format_metrics_table(metrics))
    return 0


if __name__ == "__main__":
    run_cli(main)
