"""The synthetic xLAM generator: catalog, determinism, frequencies, row kinds, literal argument values, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import synthetic_tables
import synthetic_xlam
import xlam_datasets
from conftest import digest, digest_in_fresh_interpreter

REPO = Path(__file__).resolve().parents[1]
SMALL_TOOLS = 30


@pytest.fixture(scope="module")
def small_rows() -> list[dict]:
    """Every row of a 30-tool corpus (about ten thousand rows, well under a second)."""
    return synthetic_xlam.generate_rows(seed=3, num_tools=SMALL_TOOLS)


def tool_catalog(seed: int = 0, num_tools: int = 400) -> list[dict]:
    """The xLAM tool dicts of a catalog: `search` first, then the tools in the order of intended use."""
    return [tool.to_xlam() for tool in synthetic_xlam._select_tools(seed, num_tools)]


def _names(row: dict) -> list[str]:
    return [call["name"] for call in json.loads(row["answers"])]


def test_catalog_has_enough_realistic_typed_tools():
    catalog = tool_catalog()
    names = [tool["name"] for tool in catalog]
    assert len(names) == 401 and len(set(names)) == 401
    assert names[0] == "search"
    assert synthetic_xlam.MAX_NUM_TOOLS >= 400
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)+|search", name) for name in names)
    seen_types = Counter()
    for tool in catalog:
        assert set(tool) == {"name", "description", "parameters"}
        assert tool["description"].endswith(".") and len(tool["description"]) > 15
        assert tool["parameters"]
        for arg, spec in tool["parameters"].items():
            kind, _, optional = spec["type"].partition(", ")
            seen_types[kind] += 1
            assert kind in {"str", "int", "float", "bool"}
            assert optional in {"", "optional"}
            assert ("default" in spec) == (optional == "optional")
            if optional:
                expected = {"str": str, "int": int, "float": float, "bool": bool}[kind]
                assert type(spec["default"]) is expected, (tool["name"], arg)
                choices = re.findall(r"'([^']+)'", spec["description"].partition("One of ")[2])
                if choices:
                    assert spec["default"] in choices, (tool["name"], arg)
    assert all(seen_types[kind] > 20 for kind in ("str", "int", "float", "bool"))


def documented_last_rank() -> int:
    """The highest tool rank the documented runs use: the round scripts' defaults and the examples of
    README.md and docs/."""
    ends = []
    for script in ("run_n_rounds_main.sh", "run_n_rounds_lora.sh"):
        text = (REPO / script).read_text()
        value = {name: int(re.search(rf"^{name}=\${{{name}:-(\d+)}}", text, re.M).group(1))
                 for name in ("NUM_ROUNDS", "TOOLS_PER_ROUND", "START_TOOL")}
        ends.append(value["START_TOOL"] + value["NUM_ROUNDS"] * value["TOOLS_PER_ROUND"] - 1)
    for rounds in re.findall(r"--training_rounds ([0-9:,-]+)", "".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])):
        ends.extend(int(end) for end in re.findall(r"-(\d+):", rounds))
    return max(ends)


def test_most_used_tools_never_share_a_domain_object():
    tools = synthetic_xlam._select_tools(0, 400)[1:]
    objects = [tool.domain_object for tool in tools]
    distinct = len(set(objects))
    assert distinct >= documented_last_rank(), "the documented rounds draw from the head of one tool per object"
    assert len(set(objects[:distinct])) == distinct
    assert set(objects[distinct:]) <= set(objects[:distinct])
    assert all(f"_{tool.domain_object}" in tool.name for tool in tools)


def test_catalog_is_deterministic_and_depends_on_its_seed():
    catalog = tool_catalog(seed=5)
    assert digest(catalog) == digest_in_fresh_interpreter(
        "import synthetic_xlam", "[tool.to_xlam() for tool in synthetic_xlam._select_tools(5, 400)]")
    assert catalog != tool_catalog(seed=6)


def test_rows_are_deterministic_from_the_seed():
    first = synthetic_xlam.generate_rows(seed=11, num_tools=40, num_rows=500)
    assert first == synthetic_xlam.generate_rows(seed=11, num_tools=40, num_rows=500)
    other = synthetic_xlam.generate_rows(seed=12, num_tools=40, num_rows=500)
    assert [row["query"] for row in other] != [row["query"] for row in first]


def test_rank_names_the_same_tool_for_every_row_seed():
    ranked = [xlam_datasets.rank_tools(synthetic_xlam.generate_rows(seed=seed, num_tools=SMALL_TOOLS))
              for seed in (0, 42)]
    assert ranked[0] == ranked[1]


def test_rows_have_the_xlam_format(small_rows):
    assert [row["id"] for row in small_rows] == list(range(len(small_rows)))
    for index, row in enumerate(small_rows):
        xlam_datasets.validate_row(row, index, "synthetic")
        offered = {tool["name"] for tool in json.loads(row["tools"])}
        assert set(_names(row)) <= offered


def test_every_query_is_distinct(small_rows):
    queries = [row["query"] for row in small_rows]
    assert len(set(queries)) == len(queries)


def test_argument_values_appear_verbatim_in_the_query(small_rows):
    for row in small_rows:
        for call in json.loads(row["answers"]):
            for value in call["arguments"].values():
                if not isinstance(value, bool):
                    assert str(value) in row["query"], (value, row["query"])


def test_frequencies_are_zipf_like_with_distinct_counts(small_rows):
    counts = Counter()
    for row in small_rows:
        names = set(_names(row))
        if len(names) == 1:
            counts[names.pop()] += 1
    catalog_order = [tool["name"] for tool in tool_catalog(num_tools=SMALL_TOOLS)]
    by_use = sorted(counts, key=lambda name: -counts[name])
    assert by_use == catalog_order
    values = [counts[name] for name in by_use]
    planned = synthetic_xlam.single_tool_counts(SMALL_TOOLS)
    assert values == [round(synthetic_xlam.SEARCH_SHARE_OF_TOP * planned[0]), *planned]
    assert len(set(values)) == len(values)
    assert values[-1] >= synthetic_xlam.MIN_SINGLE_TOOL_ROWS


def test_counts_for_the_full_catalog_keep_every_tool_above_sixty():
    counts = synthetic_xlam.single_tool_counts(400)
    assert len(set(counts)) == 400 and counts == sorted(counts, reverse=True)
    assert min(counts) >= 60


def test_rows_mix_single_multi_call_and_multi_tool(small_rows):
    kinds = Counter()
    for row in small_rows:
        names = _names(row)
        kind = "single" if len(names) == 1 else "same_tool" if len(set(names)) == 1 else "multi_tool"
        kinds[kind] += 1
    # Per tool (search included) the planned single-tool rows, MULTI_CALL_SHARE of them with several calls of it;
    # on top, MULTI_TOOL_SHARE of all those rows join several tools.
    planned = synthetic_xlam.single_tool_counts(SMALL_TOOLS)
    planned = [round(synthetic_xlam.SEARCH_SHARE_OF_TOP * planned[0]), *planned]
    same_tool = sum(round(synthetic_xlam.MULTI_CALL_SHARE * count) for count in planned)
    assert kinds["same_tool"] == same_tool
    assert kinds["single"] == sum(planned) - same_tool
    assert kinds["multi_tool"] == round(synthetic_xlam.MULTI_TOOL_SHARE * sum(planned))


def test_same_tool_calls_differ_only_in_one_argument(small_rows):
    checked = 0
    for row in small_rows:
        calls = json.loads(row["answers"])
        if len(calls) > 1 and len({call["name"] for call in calls}) == 1:
            first = calls[0]["arguments"]
            for call in calls[1:]:
                changed = [key for key in first if first[key] != call["arguments"][key]]
                assert len(changed) == 1 and set(call["arguments"]) == set(first)
            checked += 1
    assert checked > 100


def test_num_rows_keeps_a_prefix_of_the_plan():
    rows = synthetic_xlam.generate_rows(seed=2, num_tools=20, num_rows=300)
    assert len(rows) == 300


def test_num_tools_beyond_the_grammar_is_refused():
    with pytest.raises(ValueError, match="num_tools"):
        synthetic_xlam.generate_rows(num_tools=synthetic_xlam.MAX_NUM_TOOLS + 1)


@pytest.mark.slow
def test_cli_writes_the_rows(tmp_path):
    output = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "synthetic_xlam.py", "--output", str(output), "--num_tools", "20",
                             "--seed", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    assert rows == synthetic_xlam.generate_rows(seed=4, num_tools=20)


@pytest.mark.slow
def test_cli_rejects_too_many_tools(tmp_path):
    result = subprocess.run([sys.executable, "synthetic_xlam.py", "--output", str(tmp_path / "rows.json"),
                             "--num_tools", "100000"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--num_tools" in result.stderr
    assert "Traceback" not in result.stderr


def test_spare_tools_are_the_grammars_tools_no_corpus_calls():
    spare = synthetic_xlam.spare_tools()
    corpus = {tool["name"] for tool in tool_catalog()}
    names = [tool.name for tool in spare]
    assert len(names) == len(synthetic_xlam.CANDIDATES) - 400 and names == sorted(names)
    assert not corpus & set(names)
    assert all(tool.templates for tool in spare), "each has the query templates rows are written from"


def test_rows_for_spare_tools_are_single_tool_rows_of_the_grammar():
    tools = synthetic_xlam.spare_tools()[:3]
    rows = synthetic_xlam.generate_tool_rows(tools, 50, seed=1)
    assert rows == synthetic_xlam.generate_tool_rows(tools, 50, seed=1), "deterministic"
    assert len(rows) == 150 and len({row["query"] for row in rows}) == 150
    calls = Counter(len(set(_names(row))) for row in rows)
    assert calls == {1: 150}, "one tool per row"
    assert Counter(_names(row)[0] for row in rows) == {tool.name: 50 for tool in tools}
    several = sum(len(_names(row)) > 1 for row in rows)
    assert several == 3 * round(synthetic_xlam.MULTI_CALL_SHARE * 50)
    for row in rows:
        (name,) = set(_names(row))
        offered = {tool["name"] for tool in json.loads(row["tools"])}
        assert name in offered and offered <= {tool.name for tool in tools}


# The default corpus of seed 0 (400 tools, 125817 rows) as the generator wrote it before the catalog grew past 400.
DEFAULT_CORPUS_DIGEST = "9d2b2b5cc41cc7f08185e1d149143c2e420bb52794d5d8a31616e7c063d46e6a"
DEFAULT_CORPUS_ROWS = 125817


def test_the_catalog_grows_past_1400_tools_in_blocks_none_of_them_a_grammar_or_backbone_tool():
    assert synthetic_xlam.MAX_NUM_TOOLS >= 1400
    tools = synthetic_xlam._select_tools(0, 1400)[1:]
    base, extension = tools[:400], tools[400:]
    assert [t.name for t in base] == [t.name for t in synthetic_xlam._select_tools(0, 400)[1:]]
    assert len({t.name for t in tools}) == 1400
    assert not {t.name for t in extension} & {t.name for t in synthetic_xlam.CANDIDATES}
    pairs = [(t.domain_object, t.name.rsplit("_", 1)[-1]) for t in extension]
    assert len(set(pairs)) == len(pairs), "one extension tool per domain object and scope"
    scoped = extension[0]
    assert any(synthetic_tables.SCOPES[scoped.name.rsplit("_", 1)[-1]].phrase in a for a in scoped.actions)
    for bad in (401, 450, synthetic_xlam.MAX_NUM_TOOLS + 100):
        with pytest.raises(ValueError, match="num_tools"):
            synthetic_xlam.check_num_tools(bad)
    assert [synthetic_xlam.corpus_size_for(r) for r in (50, 400, 401, 1400, 1401)] == [400, 400, 500, 1400, 1500]


@pytest.mark.slow
def test_a_grown_corpus_keeps_the_default_rows_byte_for_byte_and_ranks_its_blocks_in_catalog_order():
    rows = synthetic_xlam.generate_rows(seed=0, num_tools=600)
    assert digest(rows[:DEFAULT_CORPUS_ROWS]) == DEFAULT_CORPUS_DIGEST
    assert [row["id"] for row in rows] == list(range(len(rows)))
    ranked = xlam_datasets.rank_tools(rows)
    assert ranked == [t.name for t in synthetic_xlam._select_tools(0, 600)[1:]]
    # A block's rows do not depend on later blocks.
    block = (len(rows) - DEFAULT_CORPUS_ROWS) // 2
    assert synthetic_xlam.generate_rows(seed=0, num_tools=500) == rows[: DEFAULT_CORPUS_ROWS + block]
