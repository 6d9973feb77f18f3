"""Compare finished runs (TokMem, LoRA, LoRA + replay, ICL) side by side: one table, one plot.

    python compare_runs.py runs/tokmem_A runs/lora_B runs/lora_replay_C runs/icl_D [--output runs/comparison.png]

For every run it reads summary.json and reports tool F1, call F1, exact match and parse-error rate on each round's
test set after the last round, their average, backward transfer, trainable parameters and wall time, in this
toolkit's scoring and in the original toolkit's ("paper" rows, the numbers to put beside the paper's tables). The
same numbers go to a JSON file beside the plot. Test sets are matched by name (`1-20`, ...), so a one-round
in-context run lands in the column of the test set it scored; cells a run did not evaluate show as `-`, a
parse-error rate with no predicted call to rate as `n/a`, and a metric an older summary lacks as `-`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from common import (CliParser, UserError, atomic_write_json, atomic_write_with, check_writable, read_json, run_cli,
                    setup_logging)
from experiment import average_after_last, backward_transfer

logger = logging.getLogger("compare_runs")

# Every summary has these (docs/DESIGN.md); they are plotted.
METRICS = (("avg_tool_f1_score", "tool F1"), ("avg_f1_score", "call F1"), ("exact_accuracy", "exact"))
# Tabled and written to the JSON when a summary has them (older summaries lack the paper_ ones).
OPTIONAL_METRICS = (
    ("parse_error_rate", "parse err"),
    ("paper_avg_tool_f1_score", "paper tool F1"),
    ("paper_avg_f1_score", "paper call F1"),
    ("paper_exact_accuracy", "paper exact"),
    ("paper_parse_error_rate", "paper parse err"),
)
TABLE_METRICS = METRICS + OPTIONAL_METRICS


def summary_path(path: Path) -> Path:
    """A run directory's summary.json (a path to the file itself is taken as is)."""
    return path if path.suffix == ".json" else path / "summary.json"


def validate_summary(summary: object, where: Path) -> dict:
    """Check the docs/DESIGN.md summary shape this command relies on; anything else is a UserError naming the file."""
    if not isinstance(summary, dict):
        raise UserError(f"{where}: expected a JSON object")
    rounds = summary.get("rounds")
    if not isinstance(summary.get("method"), str) or not isinstance(rounds, list) or not rounds:
        raise UserError(f"{where}: needs a 'method' name and a non-empty 'rounds' list")
    matrix = summary.get("matrix")
    if not isinstance(matrix, dict):
        raise UserError(f"{where}: missing the 'matrix' object")
    required = {metric for metric, _ in METRICS}
    for metric, _ in TABLE_METRICS:
        if metric not in matrix and metric not in required:
            continue
        grid = matrix.get(metric)
        square = isinstance(grid, list) and len(grid) == len(rounds) and all(
            isinstance(row, list) and len(row) == len(rounds) for row in grid)
        if not square:
            raise UserError(f"{where}: matrix[{metric!r}] must be a {len(rounds)} x {len(rounds)} list of rows")
        if any(v is not None and not isinstance(v, (int, float)) for row in grid for v in row):
            raise UserError(f"{where}: matrix[{metric!r}] holds a value that is neither a number nor null")
    return summary


def load_run(path: Path) -> dict:
    """One run's summary.json, validated; a missing file suggests the run is unfinished."""
    file = summary_path(path)
    if not file.is_file():
        raise UserError(f"{file} not found (is {path} a finished run directory?)")
    return validate_summary(read_json(file, "run summary"), file)


def run_labels(paths: Sequence[Path], summaries: Sequence[dict]) -> list[str]:
    """A label per run, every one different: the method name, with the directory name added where two runs share a
    method, its whole path where two such directories share a name, and `#k` (k-th time given) where a run is given
    more than once."""
    counts = Counter(s["method"] for s in summaries)
    labels = [s["method"] if counts[s["method"]] == 1 else f"{s['method']} ({p.name})"
              for p, s in zip(paths, summaries)]
    counts = Counter(labels)
    labels = [label if counts[label] == 1 else f"{s['method']} ({p})" for label, p, s in zip(labels, paths, summaries)]
    counts, seen = Counter(labels), Counter()
    numbered = []
    for label in labels:
        seen[label] += 1
        numbered.append(label if counts[label] == 1 else f"{label} #{seen[label]}")
    return numbered


def column_names(summaries: Sequence[dict]) -> list[str]:
    """Every test-set name, in order of first appearance."""
    names: list[str] = []
    for summary in summaries:
        names += [name for name in summary["rounds"] if name not in names]
    return names


def comparison_rows(summary: dict, columns: Sequence[str]) -> dict[str, dict]:
    """Per metric the summary has: the last row of the matrix by test-set name, the average after the last round,
    and BWT."""
    rows = {}
    for metric, _ in TABLE_METRICS:
        grid = summary["matrix"].get(metric)
        if grid is None:
            continue
        last = dict(zip(summary["rounds"], grid[-1]))
        rows[metric] = {
            "after_last": [last.get(name) for name in columns],
            "average": average_after_last(grid),
            "backward_transfer": backward_transfer(grid),
        }
    return rows


def evaluated_columns(summary: dict, columns: Sequence[str]) -> list[bool]:
    """Per column: whether the run scored that test set after its last round (its tool F1 cell is a number)."""
    last = dict(zip(summary["rounds"], summary["matrix"]["avg_tool_f1_score"][-1]))
    return [last.get(name) is not None for name in columns]


def _trainable(summary: dict) -> int | None:
    """Trainable parameters from the summary's parameter breakdown, when it has one."""
    parameters = summary.get("parameters")
    return parameters.get("trainable") if isinstance(parameters, dict) else None


def _cell(value: float | int | None, fmt: str = "{:.3f}", absent: str = "-") -> str:
    """A number, or `absent` for None."""
    return absent if value is None else fmt.format(value)


def format_table(labels: Sequence[str], summaries: Sequence[dict], columns: Sequence[str]) -> str:
    """One table: a row per method and metric, a column per test set, then average, BWT, parameters, wall time."""
    label_width = max(12, *(len(label) for label in labels)) + 2
    title_width = max(len(title) for _, title in TABLE_METRICS) + 2
    widths = [max(8, len(name) + 2) for name in columns]
    header = ("method".ljust(label_width) + "metric".ljust(title_width)
              + "".join(n.rjust(w) for n, w in zip(columns, widths))
              + "average".rjust(10) + "BWT".rjust(9) + "trainable".rjust(12) + "wall s".rjust(9))
    lines = ["after the last round, on each round's test set (paper rows: the original toolkit's scoring)",
             header, "-" * len(header)]
    for label, summary in zip(labels, summaries):
        rows = comparison_rows(summary, columns)
        evaluated = evaluated_columns(summary, columns)
        trainable = _trainable(summary)
        for index, (metric, title) in enumerate(TABLE_METRICS):
            row = rows.get(metric)
            first = index == 0
            if row is None:
                cells = ["-"] * len(columns) + ["-", "-"]
            else:
                cells = [_cell(v, absent="n/a" if scored else "-") for v, scored in zip(row["after_last"], evaluated)]
                cells += [_cell(row["average"], absent="n/a" if any(evaluated) else "-"),
                          _cell(row["backward_transfer"], "{:+.3f}")]
            lines.append(
                (label if first else "").ljust(label_width) + title.ljust(title_width)
                + "".join(c.rjust(w) for c, w in zip(cells, widths + [10, 9]))
                + (_cell(trainable, "{:,}") if first else "").rjust(12)
                + (_cell(summary.get("wall_seconds"), "{:.1f}") if first else "").rjust(9)
            )
    return "\n".join(lines)


def comparison_json(paths: Sequence[Path], labels: Sequence[str], summaries: Sequence[dict],
                    columns: Sequence[str]) -> dict:
    """The table's numbers as JSON: per run, per metric it has, the after-last-round cells by test set (null where
    not evaluated or absent), the average and BWT."""
    runs = []
    for path, label, summary in zip(paths, labels, summaries):
        rows = comparison_rows(summary, columns)
        runs.append({
            "label": label,
            "method": summary["method"],
            "summary": str(summary_path(path)),
            "trainable": _trainable(summary),
            "wall_seconds": summary.get("wall_seconds"),
            "metrics": {metric: {"after_last": dict(zip(columns, row["after_last"])), "average": row["average"],
                                 "backward_transfer": row["backward_transfer"]} for metric, row in rows.items()},
        })
    return {"columns": list(columns), "runs": runs}


def plot_comparison(labels: Sequence[str], summaries: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    """Bars per metric (test sets and average, after the last round) and the first test set's curve over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4.6 * (len(METRICS) + 1), 4.0))
    groups = list(columns) + ["average"]
    width = 0.8 / len(summaries)
    for ax, (metric, title) in zip(axes, METRICS):
        for k, (label, summary) in enumerate(zip(labels, summaries)):
            row = comparison_rows(summary, columns)[metric]
            values = [float("nan") if v is None else v for v in row["after_last"] + [row["average"]]]
            ax.bar([g + (k - (len(summaries) - 1) / 2) * width for g in range(len(groups))], values, width, label=label)
        ax.set_xticks(range(len(groups)), groups, rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title} after the last round")
        ax.set_xlabel("test set")
    curve = axes[-1]
    first = columns[0]
    for k, summary in enumerate(summaries):
        if first in summary["rounds"] and len(summary["rounds"]) > 1:
            column = summary["rounds"].index(first)
            values = [row[column] for row in summary["matrix"]["avg_tool_f1_score"]]
            rounds = [i + 1 for i, v in enumerate(values) if v is not None]
            curve.plot(rounds, [v for v in values if v is not None], marker="o", color=f"C{k}")
    curve.set_xticks(range(1, max(len(s["rounds"]) for s in summaries) + 1))
    curve.set_ylim(0, 1.05)
    curve.set_xlabel("after training round")
    curve.set_title(f"tool F1 on test set {first}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_output(flag: str, path: Path, write: Callable[[], None]) -> None:
    """Run `write`; a path that cannot be written is a one-line error naming the flag."""
    try:
        write()
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be written: {err.strerror or err}") from None


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or their summary.json files)")
    parser.add_argument("--output", type=Path, default=Path("runs/comparison.png"),
                        help="the comparison plot (a .png file)")
    parser.add_argument("--json", type=Path, default=None,
                        help="the table's numbers as JSON (default: the --output path with .json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output must name a .png file, got {args.output}")
    json_path = args.json or args.output.with_suffix(".json")
    if json_path.suffix.lower() != ".json" or json_path == args.output:
        raise UserError(f"--json must name a .json file other than --output, got {json_path}")
    check_writable(args.output, "--output", "file")
    check_writable(json_path, "--json", "file")
    summaries = [load_run(path) for path in args.runs]
    labels = run_labels(args.runs, summaries)
    columns = column_names(summaries)
    numbers = comparison_json(args.runs, labels, summaries, columns)
    write_output("--json", json_path, lambda: atomic_write_json(json_path, numbers))
    write_output("--output", args.output, lambda: plot_comparison(labels, summaries, columns, args.output))
    print(format_table(labels, summaries, columns))
    print(f"plot: {args.output}\nnumbers: {json_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
