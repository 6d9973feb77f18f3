"""compare_runs.py: one table and one plot over several run directories, one-line errors on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import compare_runs
from common import run_cli


def write_summary(path: Path, method: str, rounds: list[str], grid: list[list[float | None]],
                  trainable: int | None = 100, extra: dict[str, list] | None = None) -> Path:
    path.mkdir(parents=True)
    summary = {"method": method, "rounds": rounds, "wall_seconds": 12.5,
               "matrix": {m: grid for m in ("avg_tool_f1_score", "avg_f1_score", "exact_accuracy")} | (extra or {})}
    if trainable is not None:
        summary["parameters"] = {"trainable": trainable}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_table_and_plot_over_sequential_and_in_context_runs(tmp_path, capsys):
    rounds = ["1-20", "21-40"]
    runs = [
        write_summary(tmp_path / "tokmem", "tokmem", rounds, [[0.9, None], [0.8, 0.95]], 1280),
        write_summary(tmp_path / "lora", "lora", rounds, [[0.9, None], [0.2, 0.9]], 7168),
        write_summary(tmp_path / "icl", "icl", ["1-20"], [[0.5]], None),
        write_summary(tmp_path / "icl2", "icl", ["1-20+21-40"], [[None]], 0),
    ]
    output = tmp_path / "cmp.png"
    assert compare_runs.main([*map(str, runs), "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    lora = next(line for line in lines if line.startswith("lora "))
    assert lora.split() == ["lora", "tool", "F1", "0.200", "0.900", "-", "0.550", "-0.700", "7,168", "12.5"]
    tokmem = next(line for line in lines if line.startswith("tokmem"))
    assert "-0.100" in tokmem and "1,280" in tokmem
    icl = next(line for line in lines if line.startswith("icl (icl) "))
    assert icl.split()[4:8] == ["0.500", "-", "-", "0.500"]
    assert any(line.startswith("icl (icl2)") for line in lines)
    from PIL import Image

    with Image.open(output) as image:
        image.load()
        size, colours = image.size, image.convert("RGB").getcolors(maxcolors=1 << 20)
    # One bar panel per metric plus the first test set's curve over rounds, 4.6 x 4.0 inches each at 110 dpi.
    assert size == (round(4.6 * (len(compare_runs.METRICS) + 1) * 110), round(4.0 * 110))
    assert colours is None or len(colours) > 3


def table_block(lines: list[str], label: str) -> dict[str, list[str]]:
    """A run's rows of the table: metric title -> its cells (columns are separated by two spaces or more)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(label + " "))
    block = {}
    for index, line in enumerate(lines[start:start + len(compare_runs.TABLE_METRICS)]):
        fields = re.split(r"\s{2,}", line.strip())
        if index == 0:
            fields = fields[1:]
        block[fields[0]] = fields[1:]
    return block


def test_paper_rows_absent_parse_error_rates_and_the_json(tmp_path, capsys):
    rounds = ["1-20", "21-40"]
    tokmem = write_summary(tmp_path / "tokmem", "tokmem", rounds, [[0.9, None], [0.8, 0.95]], 1280, extra={
        "paper_avg_tool_f1_score": [[1.0, None], [0.9, 1.0]],
        "parse_error_rate": [[0.1, None], [None, 0.2]],  # after round 2, test set 1-20 had no predicted call
        "paper_parse_error_rate": [[0.3, None], [None, 0.5]],
    })
    older = write_summary(tmp_path / "older", "lora", rounds, [[0.9, None], [0.2, 0.9]], 7168)
    output = tmp_path / "cmp.png"
    assert compare_runs.main([str(tokmem), str(older), "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    block = table_block(lines, "tokmem")
    assert block["paper tool F1"] == ["0.900", "1.000", "0.950", "-0.100"]
    assert block["parse err"] == ["n/a", "0.200", "0.200", "-"]
    assert block["paper parse err"] == ["n/a", "0.500", "0.500", "-"]
    assert block["paper call F1"] == ["-", "-", "-", "-"]  # not in this summary
    assert table_block(lines, "lora")["paper tool F1"] == ["-", "-", "-", "-"]

    numbers = json.loads(output.with_suffix(".json").read_text())
    assert numbers["columns"] == rounds
    first, second = numbers["runs"]
    assert first["label"] == "tokmem" and first["trainable"] == 1280
    paper = first["metrics"]["paper_avg_tool_f1_score"]
    assert paper["after_last"] == {"1-20": 0.9, "21-40": 1.0}
    assert paper["average"] == pytest.approx(0.95) and paper["backward_transfer"] == pytest.approx(-0.1)
    assert first["metrics"]["parse_error_rate"]["after_last"] == {"1-20": None, "21-40": 0.2}
    assert first["metrics"]["parse_error_rate"]["backward_transfer"] is None
    assert set(second["metrics"]) == {"avg_tool_f1_score", "avg_f1_score", "exact_accuracy"}


@pytest.mark.parametrize("flags, message", [
    (["--json", "numbers.txt"], "--json must name a .json file"),
    (["--output", "a_file/cmp.png"], "a_file is a file, so nothing can be created under it"),
])
def test_bad_outputs_are_one_line_errors(tmp_path, capsys, monkeypatch, flags, message):
    run = write_summary(tmp_path / "run", "tokmem", ["1-2"], [[0.5]])
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_runs.main, [str(run), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("content, message", [
    (None, "not found (is"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"method": "x", "rounds": ["1-2"], "matrix": {}}), "matrix['avg_tool_f1_score'] must be a 1 x 1"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_bad_run_directories_are_one_line_errors(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "summary.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_runs.main, [str(run), "--output", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_runs_given_twice_or_sharing_a_name_get_labels_apart(tmp_path):
    from compare_runs import pool_runs, run_labels

    run = write_summary(tmp_path / "seed_42", "tokmem", ["1-20"], [[0.9]])
    assert pool_runs([run, run], [{"method": "tokmem"}] * 2) == [[0], [1]]  # a run is never pooled with itself

    tokmem, lora = {"method": "tokmem"}, {"method": "lora"}
    paths = [Path("runs/a/x"), Path("runs/a/x"), Path("runs/b/x"), Path("runs/c/y"), Path("runs/l")]
    labels = run_labels(paths, [tokmem, tokmem, tokmem, tokmem, lora], [[i] for i in range(5)])
    assert labels == ["tokmem (runs/a/x) #1", "tokmem (runs/a/x) #2", "tokmem (runs/b/x)", "tokmem (y)", "lora"]
    assert run_labels([Path("r1"), Path("r2")], [tokmem, lora], [[0], [1]]) == ["tokmem", "lora"]
    assert run_labels(paths[2:4], [tokmem, tokmem], [[0, 1]]) == ["tokmem n=2"]


def test_runs_differing_only_in_seed_are_pooled(tmp_path, capsys):
    rounds = ["1-20", "21-40"]
    runs = []
    for seed, last in ((42, 0.4), (1, 0.5), (2, 0.6)):
        run = write_summary(tmp_path / f"seed_{seed}", "tokmem", rounds, [[0.9, None], [0.8, last]])
        (run / "config.json").write_text(json.dumps({"method": "tokmem", "args": {
            "seed": seed, "lr": 0.01, "output_dir": str(run), "log_file": None}}))
        runs.append(run)
    other = write_summary(tmp_path / "other_lr", "tokmem", rounds, [[0.9, None], [0.7, 0.3]])
    (other / "config.json").write_text(json.dumps({"method": "tokmem", "args": {"seed": 42, "lr": 0.1}}))
    output = tmp_path / "cmp.png"
    assert compare_runs.main([*map(str, runs), str(other), "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    pooled = table_block(lines, "tokmem (seed_42) n=3")
    assert pooled["tool F1"] == ["0.800±0.000", "0.500±0.100", "0.650±0.050", "-0.100±0.000", "100", "12.5"]
    assert table_block(lines, "tokmem (other_lr)")["tool F1"] == ["0.700", "0.300", "0.500", "-0.200", "100", "12.5"]
    first = json.loads(output.with_suffix(".json").read_text())["runs"][0]
    assert first["n"] == 3 and len(first["summaries"]) == 3
    tool_f1 = first["metrics"]["avg_tool_f1_score"]
    assert tool_f1["after_last"]["21-40"] == pytest.approx(0.5)
    assert tool_f1["std"]["after_last"]["21-40"] == pytest.approx(0.1)
    assert tool_f1["n"]["average"] == 3 and tool_f1["std"]["backward_transfer"] == pytest.approx(0.0)
