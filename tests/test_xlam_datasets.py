"""The per-round re-cut: loading and validating rows, ranking, the disjoint split, the caps, the files, the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import round_files
import synthetic_xlam
import xlam_datasets
from common import UserError, run_cli
from conftest import digest, digest_in_fresh_interpreter

REPO = Path(__file__).resolve().parents[1]
CITIES = ("Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Seoul", "Quito", "Dakar", "Perth")


# ---------------------------------------------------------------------------------------------------------------
# A small corpus in the real xLAM format, built by hand


def _tool(name: str) -> dict:
    return {
        "name": name,
        "description": f"Looks up {name.replace('_', ' ')} records.",
        "parameters": {
            "city": {"description": "City name.", "type": "str", "default": "Paris"},
            "count": {"description": "How many records.", "type": "int, optional", "default": 5},
        },
    }


def _row(row_id: int, query: str, tools: list[str], calls: list[tuple[str, dict]]) -> dict:
    return {
        "id": row_id,
        "query": query,
        "tools": json.dumps([_tool(name) for name in tools]),
        "answers": json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls]),
    }


def real_format_rows(num_tools: int = 52) -> list[dict]:
    """Single-tool rows (8 to 13 per tool, distinct counts in blocks), same-tool multi-call rows, a 5-call row,
    multi-tool rows, a repeated query and a heavily used `search` tool, as in the real 60k file."""
    names = [f"lookup_{word}_records" for word in (f"{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(num_tools))]
    rows: list[dict] = []

    def add(query: str, tools: list[str], calls: list[tuple[str, dict]]) -> None:
        rows.append(_row(len(rows), query, tools, calls))

    for rank, name in enumerate(names):
        for k in range(8 + (num_tools - rank) // 10):
            city = CITIES[k % len(CITIES)]
            add(f"Find {k + 3} {name} records in {city}.", [name], [(name, {"city": city, "count": k + 3})])
        add(f"Find {name} records in Paris and in Oslo.", [name],
            [(name, {"city": "Paris"}), (name, {"city": "Oslo"})])
    add("Find lookup_aa_records records in five cities.", [names[0]],
        [(names[0], {"city": city}) for city in CITIES[:5]])
    add(f"Find 3 {names[0]} records in Paris.", [names[0]], [(names[0], {"city": "Paris", "count": 3})])
    for k in range(5):
        pair = [names[k], names[k + 1]]
        add(f"Find {pair[0]} and {pair[1]} records in Lima ({k}).", pair, [(n, {"city": "Lima"}) for n in pair])
    for k in range(40):
        add(f"Search for topic {k}.", ["search"], [("search", {"city": CITIES[k % 10]})])
    return rows


@pytest.fixture()
def xlam_file(tmp_path) -> Path:
    path = tmp_path / "xlam_small.json"
    path.write_text(json.dumps(real_format_rows()))
    return path


@pytest.fixture(scope="module")
def synthetic_rows() -> list[dict]:
    return synthetic_xlam.generate_rows(seed=1, num_tools=60)


@pytest.fixture(scope="module")
def synthetic_ranked(synthetic_rows) -> list[str]:
    return xlam_datasets.rank_tools(synthetic_rows)


def _round(rows, ranked, start=1, end=20, **overrides):
    settings = dict(max_samples_per_tool=30, train_size=1000, test_size=200, train_max_calls=4, test_max_calls=4,
                    train_ratios=(0.5, 0.5), test_ratios=(0.5, 0.5), seed=7)
    settings.update(overrides)
    return xlam_datasets.build_round(rows, ranked, start, end, xlam_datasets.CutSettings(**settings))


def _single_tool_queries(rows) -> dict[str, str]:
    """query -> tool of every single-tool row."""
    out = {}
    for row in rows:
        names = {call["name"] for call in json.loads(row["answers"])}
        if len(names) == 1:
            out[row["query"]] = names.pop()
    return out


def _distinct_tools(sample: dict) -> int:
    return len(set(sample["tools"]))


# ---------------------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("text, expected", [("1-50", (1, 50)), ("50", (1, 50)), (" 51 - 100 ", (51, 100)),
                                            ("7-7", (7, 7))])
def test_parse_range_accepts_n_and_start_end(text, expected):
    assert xlam_datasets.parse_range(text) == expected


@pytest.mark.parametrize("text, message", [("50-1", "reversed"), ("0-5", "start at 1"), ("0", "start at 1"),
                                           ("a-b", "expected N or START-END"), ("1-", "expected"), ("", "expected"),
                                           ("1-2-3", "expected")])
def test_parse_range_rejects_bad_ranges(text, message):
    with pytest.raises(UserError, match=message):
        xlam_datasets.parse_range(text)


def test_parse_ranges_takes_a_comma_list():
    assert xlam_datasets.parse_ranges("1-50,51-100") == [(1, 50), (51, 100)]


@pytest.mark.parametrize("text, message", [("0.5,0.6", "sum to 1"), ("1", "two numbers"), ("a,b", "two numbers"),
                                           ("1.5,-0.5", r"\[0, 1\]"), ("0.3,0.3,0.4", "two numbers")])
def test_parse_ratios_rejects_bad_ratios(text, message):
    with pytest.raises(UserError, match=message):
        xlam_datasets.parse_ratios(text, "--train_multi_tool_ratios")


def test_parse_ratios_accepts_shares_summing_to_one():
    assert xlam_datasets.parse_ratios("0.7,0.3", "--x") == (0.7, 0.3)
    assert xlam_datasets.parse_ratios("1,0", "--x") == (1.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def test_read_xlam_file_reads_a_json_list_and_json_lines(tmp_path, xlam_file):
    rows = xlam_datasets.read_xlam_file(xlam_file)
    assert rows == real_format_rows()
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert xlam_datasets.read_xlam_file(lines) == rows
    assert xlam_datasets.load_xlam_rows("xlam", str(lines), seed=0) == rows


def _write_rows(tmp_path, rows) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return path


def _broken(index: int, **changes) -> list[dict]:
    rows = real_format_rows()[:5]
    rows[index] = {**rows[index], **changes}
    return rows


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"id": 0, "query": "q", "tools": "[]"}], "row 0: missing field 'answers'"),
        (_broken(2, tools="[{not json"), "row 2: field 'tools' is not valid JSON"),
        (_broken(1, answers='{"name": "x"}'), "row 1: field 'answers' must encode a JSON list"),
        (_broken(3, answers='[{"name": "x"}]'), "row 3: field 'answers' item 0 has no 'arguments'"),
        (_broken(3, answers='[{"name": "", "arguments": {}}]'), "'name' must be a non-empty string"),
        (_broken(4, answers='[{"name": "x", "arguments": [1]}]'), "'arguments' must be an object"),
        (_broken(0, tools='[{"name": "x", "description": "d"}]'), "row 0: field 'tools' item 0 has no 'parameters'"),
        (_broken(1, tools=[{"name": "x"}]), "field 'tools' must be a JSON-encoded string"),
        (_broken(4, answers='[{"name": "book_taxi", "arguments": {"city": "Rome"}}]'),
         "row 4: answer 0 calls 'book_taxi', which the row's 'tools' field does not define"),
        (_broken(2, id="seven"), "row 2: field 'id' must be an integer"),
        (_broken(2, query=""), "row 2: field 'query' must be a non-empty string"),
        (["just a string"], "row 0: expected an object"),
        ([], "holds no rows"),
    ],
)
def test_bad_rows_are_one_clear_error(tmp_path, rows, message):
    path = _write_rows(tmp_path, rows)
    with pytest.raises(UserError, match=message) as caught:
        xlam_datasets.read_xlam_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_original_recut_skips_rows_whose_answers_do_not_decode_in_one_warning(tmp_path, caplog):
    rows = real_format_rows()[:6]
    rows[1] = {**rows[1], "answers": "[{not json"}
    rows[4] = {**rows[4], "answers": '{"name": "x"}'}
    path = _write_rows(tmp_path, rows)
    with pytest.raises(UserError, match="row 1: field 'answers' is not valid JSON"):
        xlam_datasets.read_xlam_file(path)  # the toolkit's re-cut refuses the file
    with caplog.at_level("WARNING"):
        kept = xlam_datasets.read_xlam_file(path, skip_bad_answers=True)
    assert kept == [rows[0], rows[2], rows[3], rows[5]]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"xLAM file {path}: 2 row(s) left out whose 'answers' is not a JSON list (rows 1, 4), as the "
                        "original skips them (--recut original)"]
    rows[2] = {**rows[2], "query": ""}  # any other bad row is still refused
    with pytest.raises(UserError, match="row 2: field 'query' must be a non-empty string"):
        xlam_datasets.read_xlam_file(_write_rows(tmp_path, rows), skip_bad_answers=True)


def test_missing_and_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        xlam_datasets.read_xlam_file(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 0,')
    with pytest.raises(UserError, match="not valid JSON"):
        xlam_datasets.read_xlam_file(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"id": 0}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        xlam_datasets.read_xlam_file(lines)


def test_hub_without_network_says_to_pass_xlam_path(monkeypatch):
    monkeypatch.setattr(xlam_datasets, "_host_reachable", lambda endpoint, timeout=3.0: False)
    with pytest.raises(UserError, match="cannot reach the hub.*pass --xlam_path FILE"):
        xlam_datasets.load_xlam_rows("xlam", None, seed=0)


def test_xlam_path_with_synthetic_source_is_refused():
    with pytest.raises(UserError, match="--xlam_path is only read with --source xlam"):
        xlam_datasets.load_xlam_rows("synthetic", "some.json", seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Ranking and descriptions


def test_rank_tools_counts_single_tool_rows_only_and_leaves_out_search():
    rows = real_format_rows()
    ranked = xlam_datasets.rank_tools(rows)
    assert "search" not in ranked and len(ranked) == 52
    counts = Counter()
    for row in rows:
        names = {call["name"] for call in json.loads(row["answers"])}
        if len(names) == 1:
            counts[names.pop()] += 1
    assert counts["search"] == 40
    assert [counts[name] for name in ranked] == sorted((counts[name] for name in ranked), reverse=True)
    assert ranked[0] == "lookup_aa_records"


# Single-tool rows of a small file with tied counts, in file order (two same-tool calls in one row count once).
# A multi-tool row before them calls charlie and bravo first: it does not count, nor does it decide the ties.
TIED_SINGLE_TOOL_ROWS = [
    "echo", "alpha", "delta", "bravo", "foxtrot", "charlie", "search", "delta", "charlie", "foxtrot", "echo",
    "alpha", "bravo", "search", "delta", "foxtrot", "charlie", "echo", "bravo", "alpha", "delta", "foxtrot", "echo",
    "charlie", "alpha", "bravo", "search", "delta", "foxtrot",
]
# By hand: delta 5, foxtrot 5, echo 4, alpha 4, bravo 4, charlie 4, search 3 (left out). Equal counts keep the
# order of each tool's first single-tool row: delta (row 3) before foxtrot (row 5); then echo 1, alpha 2, bravo 4,
# charlie 6. Ties by name would give alpha, bravo, charlie, echo instead.
TIED_RANKING = ["delta", "foxtrot", "echo", "alpha", "bravo", "charlie"]


def tied_rows() -> list[dict]:
    rows = [_row(0, "Compare charlie and bravo records in Lima.", ["charlie", "bravo"],
                 [("charlie", {"city": "Lima"}), ("bravo", {"city": "Lima"})])]
    for position, name in enumerate(TIED_SINGLE_TOOL_ROWS):
        city = CITIES[position % len(CITIES)]
        calls = [(name, {"city": city, "count": position + 1})]
        if position == 3:
            calls.append((name, {"city": "Oslo", "count": 2}))
        offered = list(dict.fromkeys([name, "search"]))
        rows.append(_row(len(rows), f"Find {position + 1} {name} records in {city} or nearby.", offered, calls))
    return rows


def test_rank_tools_breaks_ties_by_first_single_tool_row():
    assert xlam_datasets.rank_tools(tied_rows()) == TIED_RANKING


@pytest.mark.parametrize("recut", ["toolkit", "original"])
def test_ranges_of_a_tied_file_hold_the_first_appearance_tools(capsys, tmp_path, restore_logging, recut):
    path = tmp_path / "tied.json"
    path.write_text(json.dumps(tied_rows()))
    argv = ["--top_k", "1-3,4-6", "--max_samples_per_tool", "5", "--train_size", "30", "--test_size", "2",
            "--source", "xlam", "--xlam_path", str(path), "--output_dir", str(tmp_path / "data"), "--recut", recut]
    with pytest.raises(SystemExit) as caught:
        run_cli(xlam_datasets.main, argv)
    assert caught.value.code == 0, capsys.readouterr().err
    for label, expected in (("1-3", {"delta", "foxtrot", "echo"}), ("4-6", {"alpha", "bravo", "charlie"})):
        descriptions = json.loads((tmp_path / "data" / f"tool_descriptions_tools{label}.json").read_text())
        assert set(descriptions) == expected
        assert _tools_in(tmp_path / "data", label) == expected


def test_tool_descriptions_follow_the_requested_order():
    rows = real_format_rows()
    names = xlam_datasets.rank_tools(rows)[3:6]
    descriptions = xlam_datasets.tool_descriptions(rows, names)
    assert list(descriptions) == names
    assert descriptions[names[0]] == _tool(names[0])
    with pytest.raises(UserError, match="no row offers a definition of tool"):
        xlam_datasets.tool_descriptions(rows, ["not_a_tool"])


# ---------------------------------------------------------------------------------------------------------------
# The re-cut


def test_train_and_test_share_no_source_query(synthetic_rows, synthetic_ranked):
    train, test, _ = _round(synthetic_rows, synthetic_ranked, train_size=3000)
    sources = _single_tool_queries(synthetic_rows)
    train_singles = [s["user_input"] for s in train if _distinct_tools(s) == 1]
    assert train_singles and all(query in sources for query in train_singles)
    test_text = "\n".join(sample["user_input"] for sample in test)
    train_text = "\n".join(sample["user_input"] for sample in train)
    # The first letter of a joined query may be lower-cased, so compare from the second character on.
    assert not any(query[1:] in test_text for query in train_singles)
    by_tool: dict[str, list[str]] = {}
    for query, tool in sources.items():
        by_tool.setdefault(tool, []).append(query)
    for sample in test:
        parts = [query for tool in set(sample["tools"]) for query in by_tool[tool] if query[1:] in sample["user_input"]]
        assert len(parts) == len(set(sample["tools"])), f"not one source query per tool: {sample['user_input']}"
        assert not any(query[1:] in train_text for query in parts), "a test query is also trained on"


def test_every_test_sample_joins_distinct_tools_of_the_range(synthetic_rows, synthetic_ranked):
    train, test, descriptions = _round(synthetic_rows, synthetic_ranked, 11, 30)
    names = set(synthetic_ranked[10:30])
    assert list(descriptions) == synthetic_ranked[10:30]
    assert len(test) == 200
    for sample in train + test:
        assert set(sample["tools"]) <= names
        assert len(sample["tools"]) == len(sample["function_calls"])
    for sample in test:
        order = list(dict.fromkeys(sample["tools"]))
        assert len(order) in (2, 3)
        assert [name for name, _ in itertools.groupby(sample["tools"])] == order


def test_call_caps_and_per_tool_cap_are_kept(synthetic_rows, synthetic_ranked):
    train, test, _ = _round(synthetic_rows, synthetic_ranked, max_samples_per_tool=12, train_max_calls=3,
                            test_max_calls=5, train_size=600, test_size=150)
    assert max(len(s["function_calls"]) for s in train) <= 3
    assert max(len(s["function_calls"]) for s in test) <= 5
    assert max(len(s["function_calls"]) for s in test) > 3
    sources = _single_tool_queries(synthetic_rows)
    all_text = "\n".join(sample["user_input"] for sample in train + test)
    used = Counter(tool for query, tool in sources.items() if query[1:] in all_text)
    assert used and max(used.values()) <= 12
    singles = Counter(s["tools"][0] for s in train if _distinct_tools(s) == 1)
    assert max(singles.values()) < 12


def test_train_fills_to_train_size_with_the_requested_ratios(synthetic_rows, synthetic_ranked):
    train, test, _ = _round(synthetic_rows, synthetic_ranked, train_size=900, test_size=101,
                            train_ratios=(0.7, 0.3), test_ratios=(0.2, 0.8))
    singles = [s for s in train if _distinct_tools(s) == 1]
    multi = len(train) - len(singles)
    assert len(train) == 900 and multi > 0
    assert sum(_distinct_tools(s) == 2 for s in train) == round(0.7 * multi)
    assert sum(_distinct_tools(s) == 3 for s in train) == multi - round(0.7 * multi)
    assert sum(_distinct_tools(s) == 2 for s in test) == round(0.2 * 101)
    assert sum(_distinct_tools(s) == 3 for s in test) == 101 - round(0.2 * 101)


def test_single_tool_samples_beyond_train_size_are_all_kept(synthetic_rows, synthetic_ranked):
    train, _, _ = _round(synthetic_rows, synthetic_ranked, train_size=100)
    assert len(train) > 100 and all(_distinct_tools(s) == 1 for s in train)


def test_function_calls_are_the_json_arguments_of_the_source_row(synthetic_rows, synthetic_ranked):
    train, _, _ = _round(synthetic_rows, synthetic_ranked)
    answers = {row["query"]: json.loads(row["answers"]) for row in synthetic_rows}
    for sample in train:
        if _distinct_tools(sample) == 1:
            expected = answers[sample["user_input"]]
            assert [json.loads(call) for call in sample["function_calls"]] == [c["arguments"] for c in expected]
            assert sample["tools"] == [c["name"] for c in expected]


def test_disjoint_ranges_share_no_tool(synthetic_rows, synthetic_ranked):
    first = _round(synthetic_rows, synthetic_ranked, 1, 20)
    second = _round(synthetic_rows, synthetic_ranked, 21, 40)
    tools = [{name for sample in train + test for name in sample["tools"]} for train, test, _ in (first, second)]
    assert tools[0] and tools[1] and not tools[0] & tools[1]
    assert not set(first[2]) & set(second[2])


def test_round_is_deterministic_from_the_seed(synthetic_rows, synthetic_ranked):
    here = _round(synthetic_rows, synthetic_ranked)
    imports = "import synthetic_xlam, xlam_datasets; rows = synthetic_xlam.generate_rows(seed=1, num_tools=60)"
    expression = ("xlam_datasets.build_round(rows, xlam_datasets.rank_tools(rows), 1, 20, xlam_datasets.CutSettings("
                  "max_samples_per_tool=30, train_size=1000, test_size=200, train_max_calls=4, test_max_calls=4, "
                  "train_ratios=(0.5, 0.5), test_ratios=(0.5, 0.5), seed=7))")
    assert digest(here) == digest_in_fresh_interpreter(imports, expression)
    assert here[1] != _round(synthetic_rows, synthetic_ranked, seed=8)[1]


def test_caps_too_small_for_the_ratios_are_errors(synthetic_rows, synthetic_ranked):
    with pytest.raises(UserError, match="--test_max_function_calls 2 cannot hold a 3-tool"):
        _round(synthetic_rows, synthetic_ranked, test_max_calls=2)
    with pytest.raises(UserError, match="--train_max_function_calls 1 cannot hold a 2-tool"):
        _round(synthetic_rows, synthetic_ranked, train_max_calls=1, train_size=5000)
    train, test, _ = _round(synthetic_rows, synthetic_ranked, test_max_calls=2, test_ratios=(1.0, 0.0))
    assert all(len(s["function_calls"]) == 2 for s in test)


def test_range_beyond_the_ranking_and_too_few_tools_are_errors(synthetic_rows, synthetic_ranked):
    with pytest.raises(UserError, match="only 60 tools are ranked"):
        _round(synthetic_rows, synthetic_ranked, 41, 61)
    with pytest.raises(UserError, match="3-tool test samples need 3 tools"):
        _round(synthetic_rows, synthetic_ranked, 5, 6, train_size=10, test_size=10)
    train, test, _ = _round(synthetic_rows, synthetic_ranked, 5, 6, train_size=10, test_size=10,
                            test_ratios=(1.0, 0.0))
    assert len(test) == 10


def test_join_queries_keeps_values_verbatim():
    rng = random.Random(0)
    joined = xlam_datasets.join_queries(["What is the weather in Paris", "Paris hotels under 100?",
                                         "Can you convert 5 USD?", "I need a taxi."], rng)
    assert joined.startswith("What is the weather in Paris. ")
    assert " Paris hotels under 100?" in joined and " can you convert 5 USD?" in joined
    assert " I need a taxi." in joined


def test_round_files_have_the_design_names(tmp_path, synthetic_rows, synthetic_ranked):
    train, test, descriptions = _round(synthetic_rows, synthetic_ranked, 21, 40)
    paths = xlam_datasets.write_round_files(tmp_path, 21, 40, train, test, descriptions, 4, 3)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "training/function_calling_train_tools21-40_4calls.json",
        "test/function_calling_test_tools21-40_3calls.json",
        "tool_descriptions_tools21-40.json",
    ]
    assert json.loads(paths[0].read_text()) == train
    assert json.loads(paths[1].read_text()) == test
    assert json.loads(paths[2].read_text()) == descriptions


def test_call_count_distribution_table():
    samples = [{"function_calls": ["{}"] * n} for n in (1, 1, 2, 4)]
    assert xlam_datasets.call_count_distribution(samples) == {1: 2, 2: 1, 4: 1}
    table = xlam_datasets.format_distribution(samples, samples[2:])
    assert table.splitlines()[1].split() == ["1", "2", "50.0%", "0", "0.0%"]
    assert table.splitlines()[-1].split() == ["all", "4", "100.0%", "2", "100.0%"]


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "xlam_datasets.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


SHOWN_FLAGS = ["--max_samples_per_tool", "50", "--train_size", "1000", "--test_size", "100",
               "--train_max_function_calls", "4", "--test_max_function_calls", "4"]


def _tools_in(output_dir: Path, label: str) -> set[str]:
    files = [output_dir / "training" / f"function_calling_train_tools{label}_4calls.json",
             output_dir / "test" / f"function_calling_test_tools{label}_4calls.json"]
    return {name for path in files for sample in json.loads(path.read_text()) for name in sample["tools"]}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--test_multi_tool_ratios", "0.5"], "--test_multi_tool_ratios: expected two numbers"),
        (["--max_samples_per_tool", "0"], "--max_samples_per_tool"),
        (["--xlam_path", "rows.json"], "--xlam_path is only read with --source xlam"),
        (["--test_max_function_calls", "1"], "--test_max_function_calls 1 cannot hold a 2-tool test sample"),
    ],
)
def test_main_rejects_bad_flags_before_loading_rows(capsys, tmp_path, restore_logging, argv, message):
    with pytest.raises(SystemExit) as caught:
        run_cli(xlam_datasets.main, [*argv, "--output_dir", str(tmp_path / "out")])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_main_writes_every_range_of_a_comma_list(capsys, tmp_path, restore_logging, xlam_file):
    argv = ["--top_k", "1-20,21-40", "--max_samples_per_tool", "9", "--train_size", "400", "--test_size", "30",
            "--source", "xlam", "--xlam_path", str(xlam_file), "--output_dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as caught:
        run_cli(xlam_datasets.main, argv)
    assert caught.value.code == 0
    written = sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*.json"))
    assert written == [
        "manifest_tools1-20.json", "manifest_tools21-40.json",
        "test/function_calling_test_tools1-20_4calls.json", "test/function_calling_test_tools21-40_4calls.json",
        "tool_descriptions_tools1-20.json", "tool_descriptions_tools21-40.json",
        "training/function_calling_train_tools1-20_4calls.json",
        "training/function_calling_train_tools21-40_4calls.json",
    ]
    out = capsys.readouterr().out
    assert "tools 1-20: 400 train samples, 30 test samples, 20 tools" in out and "tools 21-40:" in out


@pytest.mark.slow
def test_cli_writes_two_disjoint_synthetic_rounds(tmp_path):
    for label in ("1-50", "51-100"):
        result = _cli("--top_k", label, *SHOWN_FLAGS, "--output_dir", str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert f"tools {label}:" in result.stdout and "calls" in result.stdout
        descriptions = json.loads((tmp_path / f"tool_descriptions_tools{label}.json").read_text())
        assert len(descriptions) == 50
        assert _tools_in(tmp_path, label) == set(descriptions)
    assert not _tools_in(tmp_path, "1-50") & _tools_in(tmp_path, "51-100")
    test = json.loads((tmp_path / "test" / "function_calling_test_tools1-50_4calls.json").read_text())
    assert len(test) == 100


@pytest.mark.slow
def test_cli_reads_a_real_format_file(tmp_path, xlam_file):
    result = _cli("--top_k", "1-50", *SHOWN_FLAGS, "--output_dir", str(tmp_path), "--source", "xlam",
                  "--xlam_path", str(xlam_file))
    assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "training" / "function_calling_train_tools1-50_4calls.json").read_text())
    test = json.loads((tmp_path / "test" / "function_calling_test_tools1-50_4calls.json").read_text())
    assert len(train) == 1000 and len(test) == 100
    assert max(len(s["function_calls"]) for s in train + test) <= 4
    assert "search" not in {name for sample in train + test for name in sample["tools"]}


def _bad_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, good: ["--top_k", "50-1"], "reversed"),
        (lambda tmp, good: ["--top_k", "1-x"], "--top_k: expected N or START-END"),
        (lambda tmp, good: ["--top_k", "1-500", "--source", "xlam", "--xlam_path", good], "only 52 tools are ranked"),
        (lambda tmp, good: ["--train_multi_tool_ratios", "0.5,0.6"], "must sum to 1"),
        (lambda tmp, good: ["--source", "xlam", "--xlam_path", str(tmp / "missing.json")], "not found"),
        (lambda tmp, good: ["--source", "xlam", "--xlam_path", _bad_file(tmp, "bad.json", "{oops")],
         "is not valid JSON"),
        (lambda tmp, good: ["--source", "xlam", "--xlam_path",
                            _bad_file(tmp, "rows.json", '[{"id": 0, "query": "q", "tools": "[]"}]')],
         "row 0: missing field 'answers'"),
        (lambda tmp, good: ["--source", "xlam"], "pass --xlam_path FILE"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, xlam_file, make_args, message):
    result = _cli(*make_args(tmp_path, str(xlam_file)), "--output_dir", str(tmp_path / "out"),
                  env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# --recut original


def _original_rows() -> list[dict]:
    """Tools with 10, 6 and 3 single-call rows (ranked in that order); queries with capitals, one per call."""
    rows = []
    for name, count in (("alpha_lookup", 10), ("bravo_lookup", 6), ("charlie_lookup", 3)):
        for k in range(count):
            rows.append(_row(len(rows), f"Show {name} Records For {CITIES[k]} Number {k}", [name],
                             [(name, {"city": CITIES[k], "count": k})]))
    return rows


def _original_round(rows, **overrides):
    settings = dict(max_samples_per_tool=50, train_size=70, test_size=30, train_max_calls=4, test_max_calls=4,
                    seed=42)
    settings.update(overrides)
    return xlam_datasets.build_round_original(rows, xlam_datasets.rank_tools(rows), 1, 3,
                                              xlam_datasets.CutSettings(**settings))


def _query_of_call(rows) -> dict[tuple[str, str], str]:
    """(tool, arguments JSON) -> the query of the single-call row that made it."""
    out = {}
    for row in rows:
        (call,) = json.loads(row["answers"])
        out[(call["name"], json.dumps(call["arguments"]))] = row["query"]
    return out


def test_original_split_sizes_follow_its_formula():
    train, test, _ = _original_round(_original_rows())
    singles = Counter(sample["tools"][0] for sample in train if _distinct_tools(sample) == 1)
    # int(n * 70 / (70 + 30)) by hand: int(7.0) = 7, int(4.2) = 4, int(2.1) = 2.
    assert singles == {"alpha_lookup": 7, "bravo_lookup": 4, "charlie_lookup": 2}
    assert len(train) == 70 and len(test) == 30
    assert all(_distinct_tools(sample) >= 2 for sample in test)


def test_original_joins_lower_case_test_side_queries():
    rows = _original_rows()
    train, test, _ = _original_round(rows)
    queries = _query_of_call(rows)
    train_queries = {sample["user_input"] for sample in train if _distinct_tools(sample) == 1}
    for sample in test:
        parts = [queries[call] for call in zip(sample["tools"], sample["function_calls"])]
        assert not set(parts) & train_queries
        text = sample["user_input"]
        assert text.startswith(parts[0])
        rest = text[len(parts[0]):]
        for part in parts[1:]:
            assert part.lower() in rest and part not in rest
        assert len(rest) > sum(len(part) for part in parts[1:])  # a connector before each later query


def test_original_takes_the_first_rows_of_a_tool_in_file_order():
    rows = _original_rows()
    train, test, _ = _original_round(rows, max_samples_per_tool=4)
    queries = _query_of_call(rows)
    first_four = {row["query"] for row in rows[:4]}
    used = {queries[call] for sample in train + test for call in zip(sample["tools"], sample["function_calls"])
            if call[0] == "alpha_lookup"}
    assert used <= first_four and len(used) >= 3


def test_original_drops_calls_with_empty_arguments():
    rows = [
        _row(0, "Plain delta call.", ["delta"], [("delta", {})]),
        _row(1, "Two delta calls.", ["delta"], [("delta", {}), ("delta", {"city": "Oslo"})]),
        _row(2, "Delta in Lima.", ["delta"], [("delta", {"city": "Lima"})]),
    ]
    sources = xlam_datasets.original_sources(rows, ["delta"], 50)["delta"]
    assert [(s.query, s.calls, s.multi_call) for s in sources] == [
        ("Plain delta call.", (), False),
        ("Two delta calls.", ('{"city": "Oslo"}',), True),
        ("Delta in Lima.", ('{"city": "Lima"}',), False),
    ]


def test_original_descriptions_carry_type_in_file_order():
    rows = tied_rows()
    tools = json.loads(rows[2]["tools"])
    tools[0]["type"] = "function"
    rows[2]["tools"] = json.dumps(tools)
    descriptions = xlam_datasets.tool_descriptions(rows, ["echo", "alpha", "bravo", "charlie"], original=True)
    # Row 0 offers charlie and bravo, row 1 echo, row 2 alpha (the one given a type).
    assert list(descriptions) == ["charlie", "bravo", "echo", "alpha"]
    assert descriptions["alpha"] == {**_tool("alpha"), "type": "function"}
    assert descriptions["echo"] == {**_tool("echo"), "type": ""}


def test_original_cap_below_three_drops_the_three_tool_share(capsys, tmp_path, restore_logging):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(_original_rows()))
    argv = ["--top_k", "1-3", "--train_size", "40", "--test_size", "10", "--test_max_function_calls", "2",
            "--train_max_function_calls", "2", "--source", "xlam", "--xlam_path", str(path), "--output_dir",
            str(tmp_path / "data"), "--recut", "original"]
    with pytest.raises(SystemExit) as caught:
        run_cli(xlam_datasets.main, argv)
    assert caught.value.code == 0, capsys.readouterr().err
    test = json.loads((tmp_path / "data" / "test" / "function_calling_test_tools1-3_2calls.json").read_text())
    assert len(test) == 10 and {_distinct_tools(sample) for sample in test} == {2}


# ---------------------------------------------------------------------------------------------------------------
# Manifest: reuse when unchanged, remake when not


def _run(capsys, argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        run_cli(xlam_datasets.main, argv)
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


def _stamps(paths) -> list[tuple[int, int]]:
    return [(path.stat().st_ino, path.stat().st_mtime_ns) for path in paths]


def test_reuse_if_unchanged_keeps_current_files_and_remakes_stale_ones(capsys, tmp_path, restore_logging):
    source = tmp_path / "tied.json"
    source.write_text(json.dumps(tied_rows()))
    data = tmp_path / "data"
    argv = ["--top_k", "1-3", "--max_samples_per_tool", "5", "--train_size", "30", "--test_size", "2", "--source",
            "xlam", "--xlam_path", str(source), "--output_dir", str(data), "--reuse_if_unchanged"]
    paths = xlam_datasets.round_file_paths(data, 1, 3, 4, 4)
    manifest_path = data / "manifest_tools1-3.json"

    code, _, err = _run(capsys, argv)
    assert code == 0 and "tools 1-3: remaking the files" in err and "is missing" in err
    manifest = json.loads(manifest_path.read_text())
    assert manifest["settings"]["xlam_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["settings"]["train_size"] == 30 and manifest["settings"]["recut"] == "toolkit"
    made = _stamps(paths)

    code, out, err = _run(capsys, argv)
    assert code == 0 and "tools 1-3: present" in out and "present in" in err
    assert _stamps(paths) == made

    moved = tmp_path / "elsewhere.json"
    moved.write_bytes(source.read_bytes())
    code, out, _ = _run(capsys, [*argv, "--xlam_path", str(moved)])
    assert code == 0 and "present" in out and _stamps(paths) == made

    code, _, err = _run(capsys, [*argv, "--train_size", "40"])
    assert code == 0 and "settings changed: train_size 30 -> 40" in err
    assert len(json.loads(paths.train.read_text())) == 40
    assert json.loads(manifest_path.read_text())["settings"]["train_size"] == 40

    source.write_text(json.dumps(tied_rows() + [_row(99, "Search once more.", ["search"], [("search", {})])]))
    code, _, err = _run(capsys, [*argv, "--train_size", "40"])
    assert code == 0 and "settings changed: xlam_sha256" in err

    paths.test.write_text("[]")
    code, _, err = _run(capsys, [*argv, "--train_size", "40"])
    assert code == 0 and f"{paths.test} changed since it was made" in err
    assert json.loads(paths.test.read_text())

    manifest_path.unlink()
    code, _, err = _run(capsys, [*argv, "--train_size", "40"])
    assert code == 0 and "no manifest" in err and manifest_path.is_file()

    made = _stamps(paths)
    code, out, _ = _run(capsys, [arg for arg in argv if arg != "--reuse_if_unchanged"] + ["--train_size", "40"])
    assert code == 0 and "present" not in out and _stamps(paths) != made


def test_synthetic_code_digest_covers_the_generator_and_its_tables(monkeypatch, tmp_path):
    for name in ("xlam_datasets.py", "synthetic_xlam.py", "synthetic_tables.py"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    monkeypatch.setattr(xlam_datasets, "__file__", str(tmp_path / "xlam_datasets.py"))
    before = {source: xlam_datasets._code_sha256(source) for source in ("synthetic", "xlam")}
    with open(tmp_path / "synthetic_tables.py", "a") as tables:
        tables.write("# an edited table\n")
    assert xlam_datasets._code_sha256("synthetic") != before["synthetic"]
    assert xlam_datasets._code_sha256("xlam") == before["xlam"]


def test_provenance_names_the_settings_and_whether_the_files_match(capsys, tmp_path, restore_logging):
    data = tmp_path / "data"
    assert round_files.read_provenance(data, 1, 3, 4, 4)["settings"] is None
    source = tmp_path / "tied.json"
    source.write_text(json.dumps(tied_rows()))
    code, _, _ = _run(capsys, ["--top_k", "1-3", "--max_samples_per_tool", "5", "--train_size", "30", "--test_size",
                               "2", "--source", "xlam", "--xlam_path", str(source), "--output_dir", str(data),
                               "--recut", "original", "--seed", "3"])
    assert code == 0
    provenance = round_files.read_provenance(data, 1, 3, 4, 4)
    assert provenance["files_match"] and provenance["problems"] == []
    assert provenance["settings"]["recut"] == "original" and provenance["settings"]["seed"] == 3
    assert provenance["settings"]["source"] == "xlam"
    other_caps = round_files.read_provenance(data, 1, 3, 3, 4)
    assert not other_caps["files_match"]
    assert any("function_calling_train_tools1-3_3calls.json is missing" in p for p in other_caps["problems"])
    train = round_files.train_path(data, 1, 3, 4)
    train.write_text(train.read_text() + " ")
    assert round_files.read_provenance(data, 1, 3, 4, 4)["problems"] == [f"{train} changed since it was made"]


# ---------------------------------------------------------------------------------------------------------------
# --output_dir checked before any work


def _a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("make_output_dir, blocker", [
    (lambda tmp: _a_file(tmp / "out"), "out"),
    (lambda tmp: _a_file(tmp / "out") / "data", "out"),
    (lambda tmp: _a_file(tmp / "out" / "training").parent, "out/training"),
], ids=["is-a-file", "under-a-file", "training-is-a-file"])
def test_output_dir_that_cannot_hold_the_files_is_refused_first(capsys, tmp_path, restore_logging,
                                                                 make_output_dir, blocker):
    output_dir = make_output_dir(tmp_path)
    code, out, err = _run(capsys, ["--source", "xlam", "--xlam_path", str(tmp_path / "missing.json"),
                                   "--output_dir", str(output_dir)])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"{Path(sys.argv[0]).name}: error: --output_dir {output_dir}: {tmp_path / blocker} is a file, not a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_dir_that_is_not_writable_is_refused_first(capsys, tmp_path, restore_logging):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = _run(capsys, ["--output_dir", str(locked / "data")])
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"{locked} is not writable" in err and len(err.strip().splitlines()) == 1
