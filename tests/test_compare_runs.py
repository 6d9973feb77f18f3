"""compare_runs.py: one table and one plot over several run directories, one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import compare_runs
from common import run_cli


def write_summary(path: Path, method: str, rounds: list[str], grid: list[list[float | None]],
                  trainable: int | None = 100) -> Path:
    path.mkdir(parents=True)
    summary = {"method": method, "rounds": rounds, "wall_seconds": 12.5,
               "matrix": {m: grid for m in ("avg_tool_f1_score", "avg_f1_score", "exact_accuracy")}}
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
