"""Per-round re-cut of xLAM-format rows into the train, test and tool-description files of docs/DESIGN.md.

Tools are ranked by how many single-tool rows call them (a row calling one tool several times counts once; the
generic `search` tool is left out; equal counts keep the order of each tool's first single-tool row, the original's
rule). For the ranks `start-end`, each tool keeps up to `--max_samples_per_tool` single-tool samples, split
train/test by source query; train holds every single-tool train sample plus synthesized 2- and 3-tool samples, test
holds synthesized multi-tool samples built only from test-side queries. No sample exceeds its call cap.
`--recut original` follows the original toolkit's sampling, split, synthesis and description fields instead.

Beside each range's files, `manifest_tools{start}-{end}.json` records the settings that made them and their digests
(round_files.py); with `--reuse_if_unchanged` a range whose files match its settings is kept, any other is remade.

    python xlam_datasets.py --top_k 1-50 --max_samples_per_tool 50 --train_size 1000 --test_size 100 \\
        --train_max_function_calls 4 --test_max_function_calls 4 --output_dir data
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

from tqdm import tqdm

import round_files
from common import CliParser, UserError, atomic_write_json, hold_logs, positive_int, run_cli, setup_logging

logger = logging.getLogger(__name__)

HUB_REPO_ID = "Salesforce/xlam-function-calling-60k"
HUB_FILENAME = "xlam_function_calling_60k.json"
GENERIC_TOOL = "search"
ROW_FIELDS = ("id", "query", "tools", "answers")
TEST_FRACTION = 0.1
CONNECTORS = (
    " Also, ", " Then ", " After that, ", " Additionally, ", " In addition, ", " Next, ", " Besides that, ",
    " On top of that, ",
)
# First words of a query that read naturally in lower case after a connector; anything else (names, values, "I")
# keeps its case so that every argument value stays verbatim in the joined query.
LOWERCASE_STARTERS = frozenset(
    """what which where when who whom whose how is are was were do does did can could would will should shall may
    might please find get show tell give list check search fetch calculate compute retrieve look help convert quick
    for generate create estimate translate provide obtain identify determine book send set plan analyze summarize
    recommend predict compare export count make reserve track monitor verify validate pull locate work update modify
    change delete remove cancel schedule deliver map run break suggest forecast download keep follow watch add
    confirm roughly""".split()
)
RANGE_PATTERN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating rows
# ---------------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """Short description of a bad value for an error message."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _decode_list(row: dict, field: str, where: str) -> list:
    """The JSON list that a row's `tools` or `answers` string holds."""
    raw = row[field]
    if not isinstance(raw, str):
        raise UserError(f"{where}: field '{field}' must be a JSON-encoded string, got {_describe(raw)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: field '{field}' is not valid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(value, list):
        raise UserError(f"{where}: field '{field}' must encode a JSON list, got {_describe(value)}")
    return value


def _check_items(items: list, field: str, where: str, shape: dict[str, type]) -> None:
    """Every item is an object whose keys in `shape` hold values of the given types (names non-empty)."""
    wanted = ", ".join(f"'{key}'" for key in shape)
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{where}: field '{field}' item {position} must be an object with {wanted}, "
                            f"got {_describe(item)}")
        for key, kind in shape.items():
            if key not in item:
                raise UserError(f"{where}: field '{field}' item {position} has no '{key}'")
            value = item[key]
            if not isinstance(value, kind) or (key == "name" and not value.strip()):
                expected = {str: "a non-empty string" if key == "name" else "a string", dict: "an object"}[kind]
                raise UserError(f"{where}: field '{field}' item {position}: '{key}' must be {expected}, "
                                f"got {_describe(value)}")


def validate_row(row: Any, index: int, origin: str) -> None:
    """Check one xLAM row; a problem is a UserError naming `origin`, the row index and the field."""
    where = f"{origin}: row {index}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with fields {', '.join(ROW_FIELDS)}, got {_describe(row)}")
    for field in ROW_FIELDS:
        if field not in row:
            raise UserError(f"{where}: missing field '{field}'")
    if not isinstance(row["id"], int) or isinstance(row["id"], bool):
        raise UserError(f"{where}: field 'id' must be an integer, got {_describe(row['id'])}")
    if not isinstance(row["query"], str) or not row["query"].strip():
        raise UserError(f"{where}: field 'query' must be a non-empty string, got {_describe(row['query'])}")
    tools = _decode_list(row, "tools", where)
    _check_items(tools, "tools", where, {"name": str, "description": str, "parameters": dict})
    answers = _decode_list(row, "answers", where)
    _check_items(answers, "answers", where, {"name": str, "arguments": dict})
    defined = [tool["name"] for tool in tools]
    for position, answer in enumerate(answers):
        if answer["name"] not in defined:
            listed = ", ".join(defined[:5]) + (", ..." if len(defined) > 5 else "") if defined else "none"
            raise UserError(f"{where}: answer {position} calls {answer['name']!r}, which the row's 'tools' field "
                            f"does not define (it defines {listed})")


def _parse_rows_text(text: str, origin: str) -> list:
    """Rows from a JSON list or from JSON lines (one object per non-blank line)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{origin} is not valid JSON (line {err.lineno}: {err.msg})") from None
        return rows
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{origin}: line {line_number} is not valid JSON ({err.msg}); expected a JSON list of "
                            "rows or one JSON object per line") from None
    return rows


def _answers_decode(row: Any) -> bool:
    """Whether a row's `answers` is a JSON string of a list, what the original needs to use the row at all (a row
    that is no object or has no `answers` counts as decoding: validation refuses it, as the original fails on it)."""
    if not isinstance(row, dict) or "answers" not in row:
        return True
    try:
        return isinstance(json.loads(row["answers"]), list)
    except (TypeError, json.JSONDecodeError):
        return False


def read_xlam_file(path: str | Path, skip_bad_answers: bool = False) -> list[dict]:
    """Read and validate every row of an xLAM file (a JSON list, or JSON lines). With `skip_bad_answers` (`--recut
    original`) a row whose `answers` is not a JSON list is left out and counted in one warning, as the original
    skips it; any other bad row is still refused."""
    path = Path(path)
    origin = f"xLAM file {path}"
    if not path.is_file():
        raise UserError(f"{origin} not found (--xlam_path must name a local copy of {HUB_FILENAME})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{origin} cannot be read ({err})") from None
    rows = _parse_rows_text(text, origin)
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{origin} holds no rows; expected a non-empty JSON list of rows or JSON lines")
    skipped = [index for index, row in enumerate(rows) if not _answers_decode(row)] if skip_bad_answers else []
    if skipped:
        logger.warning("%s: %d row(s) left out whose 'answers' is not a JSON list (rows %s), as the original skips "
                       "them (--recut original)", origin, len(skipped),
                       ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else ""))
    left_out = set(skipped)
    for index, row in enumerate(tqdm(rows, desc="validating rows", unit="row", disable=None, leave=False)):
        if index not in left_out:
            validate_row(row, index, origin)
    rows = [row for index, row in enumerate(rows) if index not in left_out] if left_out else rows
    return rows


def _host_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens (the hub client itself retries for half a minute)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Silence the hub client's retry warnings so that a failure stays one line."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def download_xlam_file() -> Path:
    """The real corpus from the hub (or its cached copy); any failure says to pass --xlam_path."""
    advice = f"pass --xlam_path FILE with a local copy of {HUB_FILENAME}"
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise UserError(f"huggingface_hub is not installed, so the hub cannot be reached; {advice}") from None
    online = not constants.HF_HUB_OFFLINE and _host_reachable(constants.ENDPOINT)
    try:
        with _quiet_hub_logs():
            path = hf_hub_download(repo_id=HUB_REPO_ID, repo_type="dataset", filename=HUB_FILENAME,
                                   local_files_only=not online)
    except Exception as err:  # any hub failure (network, auth, gated repo, missing cache) means the same to the user
        reason = "no network" if not online else f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
        raise UserError(f"cannot reach the hub to download {HUB_REPO_ID} ({reason}); {advice}") from None
    return Path(path)


def resolve_source(source: str, xlam_path: str | None) -> Path | None:
    """The xLAM file that `source` reads (the hub's copy when no path is given); None for synthetic rows."""
    if source == "synthetic":
        if xlam_path is not None:
            raise UserError("--xlam_path is only read with --source xlam")
        return None
    if source == "xlam":
        return Path(xlam_path) if xlam_path is not None else download_xlam_file()
    raise UserError(f"--source must be 'synthetic' or 'xlam', got {source!r}")


def rows_from(path: Path | None, seed: int, skip_bad_answers: bool = False, last_rank: int = 0) -> list[dict]:
    """The rows of an xLAM file (`read_xlam_file`), or synthetic rows from `seed` when `path` is None: the default
    400-tool corpus, grown by whole extension blocks when `last_rank` lies past it (its rows stay the same)."""
    if path is None:
        import synthetic_xlam

        size = min(synthetic_xlam.corpus_size_for(last_rank), synthetic_xlam.MAX_NUM_TOOLS)
        return synthetic_xlam.generate_rows(seed=seed, num_tools=size)
    return read_xlam_file(path, skip_bad_answers)


def load_xlam_rows(source: str, xlam_path: str | None, seed: int) -> list[dict]:
    """xLAM rows from `source`: "synthetic" or "xlam" (the file at `xlam_path`, else the hub).

    Synthetic rows come from `seed`; their tool catalog does not, so a rank names the same tool for every seed.
    """
    return rows_from(resolve_source(source, xlam_path), seed)


# ---------------------------------------------------------------------------------------------------------------
# Ranking and tool descriptions
# ---------------------------------------------------------------------------------------------------------------


def _answers(row: dict) -> list[dict]:
    return json.loads(row["answers"])


def single_tool_name(calls: Sequence[dict]) -> str | None:
    """The tool of a single-tool row (one or more calls of one tool), else None."""
    names = {call["name"] for call in calls}
    return names.pop() if len(names) == 1 else None


def rank_tools(rows: Sequence[dict]) -> list[str]:
    """Tool names by the number of single-tool rows that call them, most first; the generic `search` tool is left out.

    Equal counts keep the order in which the tools first answer a single-tool row (the original's rule), so the real
    file's ranges hold the paper's tools.
    """
    counts: dict[str, int] = {}
    for row in tqdm(rows, desc="ranking tools", unit="row", disable=None, leave=False):
        name = single_tool_name(_answers(row))
        if name is not None and name != GENERIC_TOOL:
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda name: -counts[name])  # stable: ties stay in first-appearance order


def tool_descriptions(rows: Sequence[dict], names: Sequence[str], original: bool = False) -> dict[str, dict]:
    """{name: {"name", "description", "parameters"}} from the first row that offers each tool, in `names` order.

    `original`: as the original writes them, with a `type` field ("" when the row has none), in the order the rows
    first offer the tools.
    """
    wanted = set(names)
    found: dict[str, dict] = {}
    for row in rows:
        for tool in json.loads(row["tools"]):
            name = tool["name"]
            if name in wanted and name not in found:
                found[name] = {"name": name, "description": tool["description"], "parameters": tool["parameters"]}
                if original:
                    found[name]["type"] = tool.get("type", "")
        if len(found) == len(wanted):
            break
    missing = [name for name in names if name not in found]
    if missing:
        raise UserError(f"no row offers a definition of tool(s) {', '.join(missing[:5])} in its 'tools' field")
    return found if original else {name: found[name] for name in names}


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """ "1-50" -> (1, 50); "50" -> (1, 50). Ranks are 1-based and inclusive."""
    match = RANGE_PATTERN.match(text)
    if not match:
        raise UserError(f"--top_k: expected N or START-END (1-based, inclusive), got {text!r}")
    start, end = (int(match[1]), int(match[2])) if match[2] is not None else (1, int(match[1]))
    if start < 1 or end < 1:
        raise UserError(f"--top_k: ranks start at 1, got {text!r}")
    if start > end:
        raise UserError(f"--top_k: the range {text!r} is reversed (start {start} > end {end})")
    return start, end


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """One or more comma-separated ranges ("1-50,51-100")."""
    return [parse_range(part) for part in text.split(",")]


def ratios_text(ratios: tuple[float, float]) -> str:
    """(0.5, 0.5) -> "0.5,0.5", as the ratio flags take it."""
    return ",".join(str(share) for share in ratios)


def parse_ratios(text: str, flag: str) -> tuple[float, float]:
    """ "0.5,0.5" -> the shares of 2-tool and 3-tool samples; each in [0, 1], summing to 1."""
    parts = text.split(",")
    try:
        ratios = tuple(float(part) for part in parts)
    except ValueError:
        ratios = ()
    if len(parts) != 2 or len(ratios) != 2:
        raise UserError(f"{flag}: expected two numbers '2-tool,3-tool' such as 0.5,0.5, got {text!r}")
    if not all(0.0 <= ratio <= 1.0 for ratio in ratios):
        raise UserError(f"{flag}: each ratio must be in [0, 1], got {text!r}")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(f"{flag}: the 2-tool and 3-tool ratios must sum to 1, got {text!r} (sum {sum(ratios):g})")
    return ratios[0], ratios[1]


# A tool named like a tokenizer's special token (`<|eot_id|>`, `<s>`, `[INST]`) would be read as that token in a
# prompt or answer and can never be predicted as a tool.
SPECIAL_TOKEN_NAME = re.compile(r"<\|[^|]*\|>|^</?[A-Za-z_]+>$|^\[/?[A-Z_]+\]$")


def tool_name_problem(name: str) -> str | None:
    """Why `name` cannot be a tool's name (None: it can): a special token's form, or control characters."""
    if SPECIAL_TOKEN_NAME.search(name):
        return "is written like a tokenizer's special token, so it would be read as that token, never as a tool"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "holds control or format characters"
    return None


def check_range(start: int, end: int, ranked: Sequence[str]) -> None:
    """A range must lie within the ranking and name tools whose names can be tools (tool_name_problem)."""
    if end > len(ranked):
        raise UserError(f"--top_k {start}-{end}: only {len(ranked)} tools are ranked by single-tool use "
                        f"('{GENERIC_TOOL}' left out)")
    for rank, name in enumerate(ranked[start - 1:end], start):
        problem = tool_name_problem(name)
        if problem:
            raise UserError(f"--top_k {start}-{end}: the tool of rank {rank}, {name!r}, {problem}; remove or rename "
                            "it in the xLAM file")


def check_test_caps(test_max_calls: int, test_ratios: tuple[float, float]) -> None:
    """Test samples join 2 or 3 tools, so the test call cap must hold the tool counts the ratios ask for."""
    for num_tools, ratio in zip((2, 3), test_ratios):
        if ratio > 0 and test_max_calls < num_tools:
            raise UserError(f"--test_max_function_calls {test_max_calls} cannot hold a {num_tools}-tool test "
                            f"sample; raise it or set the {num_tools}-tool share of --test_multi_tool_ratios to 0")


# ---------------------------------------------------------------------------------------------------------------
# The per-round re-cut
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceQuery:
    """A single-tool source row: its query and its calls (argument objects as JSON strings)."""

    query: str
    calls: tuple[str, ...]


def _single_tool_queries(rows: Sequence[dict], names: Sequence[str]) -> dict[str, list[SourceQuery]]:
    """Each tool's single-tool rows in row order; a query seen before (for any tool of the range) is kept once."""
    wanted = set(names)
    by_tool: dict[str, list[SourceQuery]] = {name: [] for name in names}
    seen: set[str] = set()
    duplicates = 0
    for row in rows:
        calls = _answers(row)
        name = single_tool_name(calls)
        if name not in wanted:
            continue
        if row["query"] in seen:
            duplicates += 1
            continue
        seen.add(row["query"])
        arguments = tuple(json.dumps(call["arguments"], ensure_ascii=False) for call in calls)
        by_tool[name].append(SourceQuery(row["query"], arguments))
    if duplicates:
        logger.info("kept %d repeated single-tool queries once each", duplicates)
    return by_tool


def _test_count(available: int, test_fraction: float) -> int:
    """How many of a tool's queries go to test: a share, at least one, never all."""
    if available < 2:
        return 0
    return min(available - 1, max(1, round(available * test_fraction)))


def _split_tool(queries: list[SourceQuery], name: str, *, max_samples: int, max_calls: int, test_fraction: float,
                seed: int) -> tuple[list[SourceQuery], list[SourceQuery], int]:
    """(train side, test side, number over the call caps) for one tool; the same for a tool in any range."""
    usable = [query for query in queries if len(query.calls) <= max_calls]
    rng = random.Random(f"split:{seed}:{name}")
    rng.shuffle(usable)
    kept = usable[:max_samples]
    n_test = _test_count(len(kept), test_fraction)
    return kept[n_test:], kept[:n_test], len(queries) - len(usable)


def _sample(parts: Sequence[tuple[str, SourceQuery]], text: str) -> dict:
    tools = [name for name, query in parts for _ in query.calls]
    calls = [call for _, query in parts for call in query.calls]
    return {"user_input": text, "tools": tools, "function_calls": calls}


def _soften_start(query: str) -> str:
    """Lower-case the first letter when the first word is a common opener, so the query can follow a connector."""
    first_word = query.split(" ", 1)[0].rstrip(",:")
    word = first_word.lower().removesuffix("'s")
    if word in LOWERCASE_STARTERS and first_word[:1].isupper():
        return query[:1].lower() + query[1:]
    return query


def join_queries(queries: Sequence[str], rng: random.Random) -> str:
    """Join queries into one request with connectors (" Also, ", " Then ", ...); argument values stay verbatim."""
    text = queries[0].strip()
    for query in queries[1:]:
        if text[-1:] not in ".?!":
            text += "."
        text += rng.choice(CONNECTORS) + _soften_start(query.strip())
    return text


def _draw_parts(pool: dict[str, list[SourceQuery]], eligible: Sequence[str], num_tools: int, max_calls: int,
                rng: random.Random) -> list[tuple[str, SourceQuery]] | None:
    """Distinct tools with one query each whose calls fit `max_calls` together; None when this draw cannot fit."""
    budget = max_calls
    parts = []
    for position, name in enumerate(rng.sample(list(eligible), num_tools)):
        room = budget - (num_tools - position - 1)
        fitting = [query for query in pool[name] if len(query.calls) <= room]
        if not fitting:
            return None
        query = rng.choice(fitting)
        parts.append((name, query))
        budget -= len(query.calls)
    return parts


@dataclass(frozen=True)
class SplitLimits:
    """What one split (train or test) asks for, with the flag names that set it (for error messages)."""

    name: str
    max_calls: int
    cap_flag: str
    ratio_flag: str
    size_flag: str


def synthesize_multi_tool(pool: dict[str, list[SourceQuery]], count: int, num_tools: int, limits: SplitLimits,
                          rng: random.Random, range_label: str) -> list[dict]:
    """`count` distinct samples joining `num_tools` distinct tools' queries, within the split's call cap."""
    if count == 0:
        return []
    if num_tools > limits.max_calls:
        raise UserError(f"{limits.cap_flag} {limits.max_calls} cannot hold a {num_tools}-tool sample; set the "
                        f"{num_tools}-tool share of {limits.ratio_flag} to 0 or raise the cap")
    eligible = [name for name, queries in pool.items() if queries]
    if len(eligible) < num_tools:
        raise UserError(f"tools {range_label}: {num_tools}-tool {limits.name} samples need {num_tools} tools with "
                        f"{limits.name} queries, only {len(eligible)} have one; widen --top_k or change "
                        f"{limits.ratio_flag}")
    samples: list[dict] = []
    seen: set[tuple[str, ...]] = set()
    attempts_left = 50 * count + 1000
    while len(samples) < count:
        attempts_left -= 1
        if attempts_left < 0:
            raise UserError(f"tools {range_label}: could build only {len(samples)} of {count} distinct "
                            f"{num_tools}-tool {limits.name} samples within {limits.cap_flag} {limits.max_calls}; "
                            f"lower {limits.size_flag} or widen --top_k")
        parts = _draw_parts(pool, eligible, num_tools, limits.max_calls, rng)
        if parts is None:
            continue
        key = tuple(query.query for _, query in parts)
        if key in seen:
            continue
        seen.add(key)
        samples.append(_sample(parts, join_queries([query.query for _, query in parts], rng)))
    return samples


@dataclass(frozen=True)
class CutSettings:
    """How a range's rows are cut into its files: the flags of the same meaning (`*_max_calls` are
    --*_max_function_calls, `*_ratios` the --*_multi_tool_ratios shares of 2- and 3-tool samples)."""

    max_samples_per_tool: int = 50
    train_size: int = 5000
    test_size: int = 500
    train_max_calls: int = 4
    test_max_calls: int = 4
    train_ratios: tuple[float, float] = (0.5, 0.5)
    test_ratios: tuple[float, float] = (0.5, 0.5)
    seed: int = 42

    def check(self, start: int, end: int, ranked: Sequence[str]) -> None:
        """The range lies within the ranking, the caps are positive and the sizes not negative."""
        check_range(start, end, ranked)
        for flag, value in (("--max_samples_per_tool", self.max_samples_per_tool),
                            ("--train_max_function_calls", self.train_max_calls),
                            ("--test_max_function_calls", self.test_max_calls)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.train_size < 0 or self.test_size < 0:
            raise UserError(f"--train_size and --test_size must not be negative, got {self.train_size} and "
                            f"{self.test_size}")


def _warn_tools_without_train(label: str, names: Sequence[str], train: Sequence[dict]) -> None:
    with_train = {sample["tools"][0] for sample in train if _distinct_tools(sample) == 1}
    without_train = [name for name in names if name not in with_train]
    if without_train:
        logger.warning("tools %s: %d tool(s) have no single-tool train sample: %s", label, len(without_train),
                       ", ".join(without_train[:5]))


def _distinct_tools(sample: dict) -> int:
    return len(set(sample["tools"]))


def _split_count(total: int, ratios: tuple[float, float]) -> tuple[int, int]:
    two_tool = round(total * ratios[0])
    return two_tool, total - two_tool


def build_round(rows: Sequence[dict], ranked: Sequence[str], start: int, end: int, cut: CutSettings,
                test_fraction: float = TEST_FRACTION) -> tuple[list[dict], list[dict], dict]:
    """(train samples, test samples, tool descriptions) for the tools ranked `start`..`end` (1-based, inclusive).

    Each tool keeps up to `max_samples_per_tool` single-tool samples that fit a call cap, split by source query
    (about `test_fraction` to test). Train: every single-tool train sample plus synthesized multi-tool samples up to
    `train_size` in all (none when the single-tool samples already reach it). Test: `test_size` synthesized
    multi-tool samples from test-side queries only. `*_ratios` split the multi-tool samples into 2- and 3-tool ones.
    """
    cut.check(start, end, ranked)
    names = list(ranked[start - 1:end])
    descriptions = tool_descriptions(rows, names)
    label = f"{start}-{end}"
    rng = random.Random(f"round:{cut.seed}:{label}")
    train_limits = SplitLimits("train", cut.train_max_calls, "--train_max_function_calls",
                               "--train_multi_tool_ratios", "--train_size")
    test_limits = SplitLimits("test", cut.test_max_calls, "--test_max_function_calls", "--test_multi_tool_ratios",
                              "--test_size")

    sources = _single_tool_queries(rows, names)
    train_singles: list[dict] = []
    train_pool: dict[str, list[SourceQuery]] = {}
    test_pool: dict[str, list[SourceQuery]] = {}
    over_cap = 0
    for name in names:
        train_side, test_side, dropped = _split_tool(
            sources[name], name, max_samples=cut.max_samples_per_tool,
            max_calls=max(cut.train_max_calls, cut.test_max_calls - 1), test_fraction=test_fraction, seed=cut.seed)
        over_cap += dropped
        train_singles += [_sample([(name, query)], query.query) for query in train_side
                          if len(query.calls) <= cut.train_max_calls]
        train_pool[name] = [query for query in train_side if len(query.calls) < cut.train_max_calls]
        test_pool[name] = [query for query in test_side if len(query.calls) < cut.test_max_calls]
    if over_cap:
        logger.info("tools %s: %d single-tool rows have more calls than the caps allow and are not used", label,
                    over_cap)
    _warn_tools_without_train(label, names, train_singles)

    multi_total = max(0, cut.train_size - len(train_singles))
    if len(train_singles) >= cut.train_size:
        logger.warning("tools %s: %d single-tool train samples already reach --train_size %d; no multi-tool train "
                       "samples are synthesized", label, len(train_singles), cut.train_size)
    two, three = _split_count(multi_total, cut.train_ratios)
    train = (train_singles + synthesize_multi_tool(train_pool, two, 2, train_limits, rng, label)
             + synthesize_multi_tool(train_pool, three, 3, train_limits, rng, label))
    rng.shuffle(train)
    two, three = _split_count(cut.test_size, cut.test_ratios)
    test = (synthesize_multi_tool(test_pool, two, 2, test_limits, rng, label)
            + synthesize_multi_tool(test_pool, three, 3, test_limits, rng, label))
    rng.shuffle(test)
    logger.info("tools %s: %d train samples (%d single-tool), %d test samples", label, len(train),
                len(train_singles), len(test))
    return train, test, descriptions


# ---------------------------------------------------------------------------------------------------------------
# The original's re-cut (--recut original)
# ---------------------------------------------------------------------------------------------------------------

# The original seeds its split, train and test streams with 42, 100 and 200; --seed S shifts all three by S - 42.
ORIGINAL_SEEDS = (42, 100, 200)
ORIGINAL_MULTI_CALL_PROBABILITY = 0.1
ORIGINAL_RETRIES = 50
ORIGINAL_CONNECTORS = (
    " Also, ", " Additionally, ", " Furthermore, ", " Moreover, ", " In addition, ", " Besides, ", " Plus, ",
    " Next, ", " Then, ", " After that, ", " On top of that, ",
)
ORIGINAL_FINAL_CONNECTORS = (" Finally, ", " Lastly, ", " At last, ")


@dataclass(frozen=True)
class OriginalSource:
    """A single-tool row as the original keeps it: the query, the JSON of the calls whose arguments are not empty,
    and whether the row made more than one call (counted before the empty ones are dropped)."""

    query: str
    calls: tuple[str, ...]
    multi_call: bool


def original_sources(rows: Sequence[dict], names: Sequence[str], max_samples: int) -> dict[str, list[OriginalSource]]:
    """Each tool's first `max_samples` single-tool rows in file order, repeated queries included."""
    by_tool: dict[str, list[OriginalSource]] = {name: [] for name in names}
    for row in rows:
        calls = _answers(row)
        name = single_tool_name(calls)
        if name in by_tool and len(by_tool[name]) < max_samples:
            kept = tuple(json.dumps(call["arguments"]) for call in calls if call["arguments"])
            by_tool[name].append(OriginalSource(row["query"], kept, len(calls) > 1))
    return by_tool


def original_train_count(available: int, train_size: int, test_size: int) -> int:
    """How many of a tool's rows go to train: int(n * train / (train + test)); the rest go to test."""
    return int(available * (train_size / (train_size + test_size)))


def original_ratios(ratios: tuple[float, float], max_calls: int) -> tuple[float, float]:
    """A call cap below 3 sets the 3-tool share to 0, as the original does."""
    return (1.0, 0.0) if max_calls < 3 else ratios


def _original_multi_tool(singles: dict[str, list[OriginalSource]], multis: dict[str, list[OriginalSource]],
                         names: Sequence[str], num_tools: int, max_calls: int, rng: random.Random) -> dict | None:
    """One sample joining `num_tools` distinct tools, or None after the original's 50 tries."""
    available = [name for name in names if singles[name]]
    if len(available) < num_tools:
        return None
    for _ in range(ORIGINAL_RETRIES):
        text, tools, calls = "", [], []
        for position, name in enumerate(rng.sample(available, num_tools)):
            use_multi_call = rng.random() < ORIGINAL_MULTI_CALL_PROBABILITY and bool(multis[name])
            source = rng.choice(multis[name] if use_multi_call else singles[name])
            piece = source.query
            if position > 0:
                final = position == num_tools - 1 and num_tools >= 3
                piece = rng.choice(ORIGINAL_FINAL_CONNECTORS if final else ORIGINAL_CONNECTORS) + piece.lower()
            if source.calls:
                text += piece
                tools += [name] * len(source.calls)
                calls += source.calls
        if calls and len(calls) <= max_calls:
            return {"user_input": text, "tools": tools, "function_calls": calls}
    return None


def _original_synthesize(pool: dict[str, list[OriginalSource]], names: Sequence[str], size: int,
                         ratios: tuple[float, float], max_calls: int, rng: random.Random, split: str,
                         label: str) -> list[dict]:
    """A split as the original makes it: train starts with every single-tool row (within the cap), test with none;
    multi-tool samples fill up to `size`; a sample that fails 50 tries is left out."""
    singles = {name: [source for source in pool[name] if not source.multi_call and source.calls] for name in names}
    multis = {name: [source for source in pool[name] if source.multi_call] for name in names}
    samples: list[dict] = []
    if split == "train":
        for name in names:
            samples += [_sample([(name, SourceQuery(s.query, s.calls))], s.query) for s in singles[name]]
        for name in names:
            samples += [_sample([(name, SourceQuery(s.query, s.calls))], s.query) for s in multis[name]
                        if s.calls and len(s.calls) <= max_calls]
    remaining = max(0, size - len(samples))
    two_tool = int(remaining * (ratios[0] / (ratios[0] + ratios[1])))
    failed = 0
    for num_tools, count in ((2, two_tool), (3, remaining - two_tool)):
        for _ in range(count):
            sample = _original_multi_tool(singles, multis, names, num_tools, max_calls, rng)
            if sample is None:
                failed += 1
            else:
                samples.append(sample)
    if failed:
        logger.warning("tools %s: %d of %d multi-tool %s samples could not be built within 50 tries and are left "
                       "out (--recut original)", label, failed, remaining, split)
    rng.shuffle(samples)
    return samples


def build_round_original(rows: Sequence[dict], ranked: Sequence[str], start: int, end: int,
                         cut: CutSettings) -> tuple[list[dict], list[dict], dict]:
    """`build_round` by the original's rules (`--recut original`).

    Per tool, the first `max_samples_per_tool` single-tool rows in file order; calls with empty arguments dropped;
    int(n * train_size / (train_size + test_size)) of them to train after a seeded shuffle. Train: every single-tool
    row plus multi-tool samples up to `train_size`; test: `test_size` multi-tool samples. A multi-tool sample draws
    distinct tools, for each a multi-call row with probability 0.1 (else a single-call row), lower-cases every query
    after the first and puts a connector before it; duplicates are allowed. With --seed 42 the random streams are
    the original's.
    """
    cut.check(start, end, ranked)
    names = list(ranked[start - 1:end])
    descriptions = tool_descriptions(rows, names, original=True)
    label = f"{start}-{end}"
    split_rng, train_rng, test_rng = (random.Random(cut.seed - ORIGINAL_SEEDS[0] + base) for base in ORIGINAL_SEEDS)
    sources = original_sources(rows, names, cut.max_samples_per_tool)
    train_pool: dict[str, list[OriginalSource]] = {}
    test_pool: dict[str, list[OriginalSource]] = {}
    for name in names:
        shuffled = list(sources[name])
        split_rng.shuffle(shuffled)
        n_train = original_train_count(len(shuffled), cut.train_size, cut.test_size)
        train_pool[name], test_pool[name] = shuffled[:n_train], shuffled[n_train:]
    train = _original_synthesize(train_pool, names, cut.train_size,
                                 original_ratios(cut.train_ratios, cut.train_max_calls), cut.train_max_calls,
                                 train_rng, "train", label)
    test = _original_synthesize(test_pool, names, cut.test_size, original_ratios(cut.test_ratios, cut.test_max_calls),
                                cut.test_max_calls, test_rng, "test", label)
    if cut.test_size and not test:
        raise UserError(f"tools {label}: no multi-tool test sample could be built (--recut original); raise "
                        "--max_samples_per_tool or --test_size, or widen --top_k")
    _warn_tools_without_train(label, names, train)
    logger.info("tools %s: %d train samples (%d single-tool), %d test samples (--recut original)", label, len(train),
                sum(_distinct_tools(sample) == 1 for sample in train), len(test))
    return train, test, descriptions


RECUTS = {"toolkit": build_round, "original": build_round_original}


# ---------------------------------------------------------------------------------------------------------------
# Files and report
# ---------------------------------------------------------------------------------------------------------------


def round_file_paths(output_dir: str | Path, start: int, end: int, train_max_calls: int,
                     test_max_calls: int) -> round_files.RoundPaths:
    """(train, test, tool descriptions) paths with exactly the names of docs/DESIGN.md."""
    return round_files.round_paths(output_dir, start, end, train_max_calls, test_max_calls)


def write_round_files(output_dir: str | Path, start: int, end: int, train: list[dict], test: list[dict],
                      descriptions: dict, train_max_calls: int, test_max_calls: int) -> list[Path]:
    """Write the three files of a round atomically; returns their paths (train, test, descriptions)."""
    paths = round_file_paths(output_dir, start, end, train_max_calls, test_max_calls)
    for path, content in zip(paths, (train, test, descriptions)):
        atomic_write_json(path, content)
    return list(paths)


def call_count_distribution(samples: Sequence[dict]) -> dict[int, int]:
    """{number of calls: number of samples}, by increasing number of calls."""
    counts = Counter(len(sample["function_calls"]) for sample in samples)
    return dict(sorted(counts.items()))


def format_distribution(train: Sequence[dict], test: Sequence[dict]) -> str:
    """A table of calls per sample for train and test, counts and shares."""
    train_counts, test_counts = call_count_distribution(train), call_count_distribution(test)
    lines = [f"{'calls':>5}  {'train':>15}  {'test':>15}"]
    for calls in sorted(set(train_counts) | set(test_counts)):
        cells = []
        for counts, total in ((train_counts, len(train)), (test_counts, len(test))):
            count = counts.get(calls, 0)
            cells.append(f"{count:>7} {100.0 * count / max(total, 1):6.1f}%")
        lines.append(f"{calls:>5}  {cells[0]}  {cells[1]}")
    lines.append(f"{'all':>5}  {len(train):>7} {100.0 if train else 0.0:6.1f}%  {len(test):>7} "
                 f"{100.0 if test else 0.0:6.1f}%")
    return "\n".join(lines)


def check_output_dir(output_dir: str | Path) -> None:
    """--output_dir (and its training/ and test/) must be directories that can be made and written; nothing is made."""
    root = Path(output_dir)
    for path in (root, root / round_files.TRAIN_DIR, root / round_files.TEST_DIR):
        if path.exists() and not path.is_dir():
            raise UserError(f"--output_dir {output_dir}: {path} is a file, not a directory")
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--output_dir {output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {output_dir}: {existing} is not writable")


def _code_sha256(source: str) -> str:
    """One digest of the code that makes the files: this module, and for synthetic rows the generator and its tables."""
    here = Path(__file__).resolve()
    generator = [here.with_name(name) for name in ("synthetic_xlam.py", "synthetic_tables.py")]
    files = [here] + (generator if source == "synthetic" else [])
    return hashlib.sha256("".join(round_files.file_sha256(path) for path in files).encode()).hexdigest()


def source_settings(source: str, path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what of the source decides the files, what is only informative) for a manifest."""
    if path is None:
        return {"source": source, "xlam_sha256": None, "code_sha256": _code_sha256(source)}, {}
    if not path.is_file():
        raise UserError(f"xLAM file {path} not found (--xlam_path must name a local copy of {HUB_FILENAME})")
    try:
        digest = round_files.file_sha256(path)
        stat = path.stat()
    except OSError as err:
        raise UserError(f"xLAM file {path} cannot be read ({err})") from None
    info = {"xlam_path": str(path.resolve()), "xlam_size": stat.st_size,
            "xlam_mtime": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds")}
    return {"source": source, "xlam_sha256": digest, "code_sha256": _code_sha256(source)}, info


def round_settings(cut: CutSettings, recut: str, start: int, end: int, source: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides one range's files (the ratios as given): a file made with other settings is stale."""
    return {
        **source,
        "recut": recut,
        "top_k": f"{start}-{end}",
        "max_samples_per_tool": cut.max_samples_per_tool,
        "train_size": cut.train_size,
        "test_size": cut.test_size,
        "train_max_function_calls": cut.train_max_calls,
        "test_max_function_calls": cut.test_max_calls,
        "train_multi_tool_ratios": list(cut.train_ratios),
        "test_multi_tool_ratios": list(cut.test_ratios),
        "seed": cut.seed,
    }


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Re-cut xLAM rows into per-round train/test/tool-description files.")
    parser.add_argument("--top_k", default="50",
                        help="tool ranks: N (= 1-N) or START-END, 1-based inclusive; several with commas "
                             "(the scripts write one range per round)")
    parser.add_argument("--max_samples_per_tool", type=positive_int, default=CutSettings.max_samples_per_tool,
                        help="single-tool samples kept per tool before the train/test split "
                             "(the scripts use SAMPLES_PER_TOOL=30)")
    parser.add_argument("--train_size", type=positive_int, default=CutSettings.train_size,
                        help="train samples in all; multi-tool ones fill up to it (the scripts use TRAIN_SIZE=600)")
    parser.add_argument("--test_size", type=positive_int, default=CutSettings.test_size,
                        help="multi-tool test samples (the scripts use TEST_SIZE=60)")
    parser.add_argument("--train_max_function_calls", type=positive_int, default=CutSettings.train_max_calls,
                        help="most calls in a train sample (the scripts use 3)")
    parser.add_argument("--test_max_function_calls", type=positive_int, default=CutSettings.test_max_calls,
                        help="most calls in a test sample (the scripts use 3)")
    parser.add_argument("--train_multi_tool_ratios", default=ratios_text(CutSettings.train_ratios),
                        help="shares of 2-tool and 3-tool train samples, summing to 1")
    parser.add_argument("--test_multi_tool_ratios", default=ratios_text(CutSettings.test_ratios),
                        help="shares of 2-tool and 3-tool test samples, summing to 1")
    parser.add_argument("--output_dir", default="data", help="where training/, test/ and descriptions go")
    parser.add_argument("--seed", type=int, default=CutSettings.seed, help="seed of the split and the synthesis")
    parser.add_argument("--source", choices=("synthetic", "xlam"), default="synthetic",
                        help="synthetic rows (offline) or the real xLAM corpus")
    parser.add_argument("--xlam_path", default=None,
                        help=f"local copy of {HUB_FILENAME} (JSON list or JSON lines) for --source xlam "
                             "(default: none, download it from the hub)")
    parser.add_argument("--recut", choices=tuple(RECUTS), default="toolkit",
                        help="toolkit: this toolkit's sampling, split and synthesis; original: the original "
                             "toolkit's (first rows per tool, its split formula, lower-cased joins, 'type' in the "
                             "descriptions)")
    parser.add_argument("--reuse_if_unchanged", action="store_true",
                        help="keep a range whose files exist and were made with the same settings (its manifest "
                             "says so); remake it otherwise, naming what changed")
    return parser


def cut_settings(args: argparse.Namespace) -> CutSettings:
    """The parsed flags as CutSettings, the ratios as given."""
    return CutSettings(max_samples_per_tool=args.max_samples_per_tool, train_size=args.train_size,
                       test_size=args.test_size, train_max_calls=args.train_max_function_calls,
                       test_max_calls=args.test_max_function_calls,
                       train_ratios=parse_ratios(args.train_multi_tool_ratios, "--train_multi_tool_ratios"),
                       test_ratios=parse_ratios(args.test_multi_tool_ratios, "--test_multi_tool_ratios"),
                       seed=args.seed)


def used_ratios(cut: CutSettings, recut: str) -> CutSettings:
    """The 2-/3-tool shares each split gets: under --recut original a cap below 3 drops the 3-tool share."""
    if recut != "original":
        return cut
    ratios = []
    for given, max_calls, flag in ((cut.train_ratios, cut.train_max_calls, "--train_max_function_calls"),
                                   (cut.test_ratios, cut.test_max_calls, "--test_max_function_calls")):
        ratios.append(original_ratios(given, max_calls))
        if ratios[-1] != given:
            logger.warning("%s %d is below 3: no 3-tool samples, as in the original", flag, max_calls)
    return replace(cut, train_ratios=ratios[0], test_ratios=ratios[1])


def _stale_ranges(output_dir: str, cut: CutSettings, settings: dict[tuple[int, int], dict]) -> list[tuple[int, int]]:
    """The ranges under --reuse_if_unchanged whose files are stale (missing, or made otherwise)."""
    stale = []
    for (start, end), wanted in settings.items():
        paths = round_file_paths(output_dir, start, end, cut.train_max_calls, cut.test_max_calls)
        reasons = round_files.stale_reasons(output_dir, start, end, wanted, paths)
        if reasons:
            logger.info("tools %d-%d: remaking the files: %s", start, end, "; ".join(reasons))
            stale.append((start, end))
        else:
            logger.info("tools %d-%d: present in %s, made with the same settings", start, end, output_dir)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: load rows, rank tools, and write the three files (and the manifest) of every requested range."""
    args = _parser().parse_args(argv)
    setup_logging()
    ranges = list(dict.fromkeys(parse_ranges(args.top_k)))
    given = cut_settings(args)
    cut = used_ratios(given, args.recut)
    check_test_caps(cut.test_max_calls, cut.test_ratios)
    check_output_dir(args.output_dir)
    with hold_logs():
        source_path = resolve_source(args.source, args.xlam_path)
        source, source_info = source_settings(args.source, source_path)
        settings = {(start, end): round_settings(given, args.recut, start, end, source) for start, end in ranges}
        todo = _stale_ranges(args.output_dir, cut, settings) if args.reuse_if_unchanged else list(settings)
        rounds = []
        if todo:
            rows = rows_from(source_path, args.seed, skip_bad_answers=args.recut == "original",
                             last_rank=max(end for _, end in todo))
            ranked = rank_tools(rows)
            for start, end in todo:
                check_range(start, end, ranked)
            logger.info("%d %s rows, %d tools ranked by single-tool use", len(rows), args.source, len(ranked))
            build = RECUTS[args.recut]
            rounds = [(start, end, build(rows, ranked, start, end, cut)) for start, end in todo]
    for start, end in ranges:
        if (start, end) not in todo:
            print(f"tools {start}-{end}: present, made with the same settings "
                  f"({round_files.manifest_path(args.output_dir, start, end)})")
    for start, end, (train, test, descriptions) in rounds:
        paths = write_round_files(args.output_dir, start, end, train, test, descriptions, cut.train_max_calls,
                                  cut.test_max_calls)
        manifest = round_files.write_manifest(
            args.output_dir, start, end, settings[(start, end)], round_files.RoundPaths(*paths),
            {**source_info, "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        table = format_distribution(train, test)
        logger.info("tools %d-%d calls per sample:\n%s", start, end, table)
        print(f"tools {start}-{end}: {len(train)} train samples, {len(test)} test samples, {len(descriptions)} tools")
        print(table)
        for path in [*paths, manifest]:
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
