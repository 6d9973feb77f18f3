"""Compare finished runs (TokMem, LoRA, LoRA + replay, ICL) side by side: one table, one plot.

    python compare_runs.py runs/tokmem_A runs/lora_B runs/lora_replay_C runs/icl_D [--output runs/comparison.png]
    python compare_runs.py runs/tokmem_seeds_X/seed_*      # SEEDS=42,1,2 bash run_n_rounds_main.sh made these

For every run it reads summary.json and reports tool F1, call F1, exact match and parse-error rate on each round's
test set after the last round, their average, backward transfer, trainable parameters and wall time, in this
toolkit's scoring and in the original toolkit's ("paper" rows, the numbers to put beside the paper's tables). The
same numbers go to a JSON file beside the plot. Test sets are matched by name (`1-20`, ...), so a one-round
in-context run lands in the column of the test set it scored; cells a run did not evaluate show as `-`, a
parse-error rate with no predicted call to rate as `n/a`, and a metric an older summary lacks as `-`.

Runs whose config.json records the same method and flags but for `--seed` (and the flags that never change numbers:
output places, logging) are pooled into one row: each cell is the mean over the seeds, `± std` (sample standard
deviation) and, in the label, n; the JSON holds the means where single runs have their values, with `std` and `n`
beside them, and the plot's bars carry the standard deviation as error bars. Validation rows (`val`) come from runs
with --validation_split.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from common import (CliParser, UserError, atomic_write_json, atomic_write_with, check_writable, read_json, run_cli,
                    setup_logging)
from experiment import RESUME_FREE_FLAGS, average_after_last, backward_transfer

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
    ("val_avg_tool_f1_score", "val tool F1"),
    ("val_avg_f1_score", "val call F1"),
    ("val_loss", "val loss"),
)
# Flags that may differ between the runs of one pool.
POOL_FREE_FLAGS = RESUME_FREE_FLAGS | {"seed"}
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
    """One run's summary.json, validated, with its validation matrices (--validation_split) as `val_` metrics; a
    missing file suggests the run is unfinished."""
    file = summary_path(path)
    if not file.is_file():
        raise UserError(f"{file} not found (is {path} a finished run directory?)")
    summary = validate_summary(read_json(file, "run summary"), file)
    validation = summary.get("validation")
    if isinstance(validation, dict) and isinstance(validation.get("matrix"), dict):
        summary["matrix"].update({f"val_{m}": g for m, g in validation["matrix"].items()})
        validate_summary(summary, file)
    return summary


def pool_key(path: Path, summary: dict) -> str:
    """What runs of one pool share: the method and every flag but the seed's and the output places (config.json);
    a run without config.json is its own pool."""
    config_file = summary_path(path).parent / "config.json"
    if not config_file.is_file():
        return f"run {summary_path(path)}"
    args = read_json(config_file, "run config").get("args", {})
    return json.dumps([summary["method"], {k: v for k, v in args.items() if k not in POOL_FREE_FLAGS}],
                      sort_keys=True)


def pool_runs(paths: Sequence[Path], summaries: Sequence[dict]) -> list[list[int]]:
    """The runs grouped into pools (indices, in order of first appearance)."""
    pools: list[list[int]] = []
    keys: dict[str, list[int]] = {}  # key -> the pool runs of that key join; a run given again starts its own
    for index, (path, summary) in enumerate(zip(paths, summaries)):
        key = pool_key(path, summary)
        pool = keys.get(key)
        if pool is None or any(Path(paths[i]).resolve() == Path(path).resolve() for i in pool):
            pool = keys[key] = []
            pools.append(pool)
        pool.append(index)
    return pools


def stat(values: Sequence[float | None]) -> dict | None:
    """{"mean", "std", "n"} over the values that are numbers (std: the sample standard deviation, None for one
    value); None when there is none."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return None
    std = statistics.stdev(numbers) if len(numbers) > 1 else None
    return {"mean": statistics.fmean(numbers), "std": std, "n": len(numbers)}


def pooled_rows(rows: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """comparison_rows of a pool's runs, each value a `stat` over the runs."""
    pooled = {}
    for metric in dict.fromkeys(m for row in rows for m in row):
        present = [row[metric] for row in rows if metric in row]
        pooled[metric] = {
            "after_last": [stat(cells) for cells in zip(*(r["after_last"] for r in present))],
            "average": stat([r["average"] for r in present]),
            "backward_transfer": stat([r["backward_transfer"] for r in present]),
        }
    return pooled


def run_labels(paths: Sequence[Path], summaries: Sequence[dict], pools: Sequence[list[int]]) -> list[str]:
    """A label per pool, every one different: the method name, with the (first) run's directory name added where
    two pools share a method, its whole path where two such directories share a name, `#k` (k-th time given) where
    a run is given more than once, and the number of runs of a pool of several."""
    firsts = [(paths[pool[0]], summaries[pool[0]]) for pool in pools]
    counts = Counter(s["method"] for _, s in firsts)
    labels = [s["method"] if counts[s["method"]] == 1 else f"{s['method']} ({p.name})" for p, s in firsts]
    counts = Counter(labels)
    labels = [label if counts[label] == 1 else f"{s['method']} ({p})" for label, (p, s) in zip(labels, firsts)]
    counts, seen = Counter(labels), Counter()
    numbered = []
    for label, pool in zip(labels, pools):
        seen[label] += 1
        label = label if counts[label] == 1 else f"{label} #{seen[label]}"
        numbered.append(label if len(pool) == 1 else f"{label} n={len(pool)}")
    return numbered


def column_names(summaries: Sequence[dict]) -> list[str]:
    """Every test-set name, in order of first appearance."""
    names: list[str] = []
    for summary in summaries:
        names += [name for name in summary["rounds"] if name not in names]
    return names


def comparison_rows(summary: dict, columns: Sequence[str]) -> dict[str, dict]:
    """Per metric the summary has (an optional one only where it holds a number: a run without --validation_split
    has no val_ number): the last row of the matrix by test-set name, the average after the last round, and BWT."""
    rows = {}
    for metric, _ in TABLE_METRICS:
        grid = summary["matrix"].get(metric)
        optional = metric not in dict(METRICS)
        if grid is None or optional and all(value is None for row in grid for value in row):
            continue
        last = dict(zip(summary["rounds"], grid[-1]))
        rows[metric] = {
            "after_last": [last.get(name) for name in columns],
            "average": average_after_last(grid),
            "backward_transfer": backward_transfer(grid),
        }
    return rows


def evaluated_columns(summaries: Sequence[dict], columns: Sequence[str]) -> list[bool]:
    """Per column: whether a run of the pool scored that test set after its last round (a number in tool F1)."""
    scored = [False] * len(columns)
    for summary in summaries:
        last = dict(zip(summary["rounds"], summary["matrix"]["avg_tool_f1_score"][-1]))
        scored = [s or last.get(name) is not None for s, name in zip(scored, columns)]
    return scored


def _trainable(summary: dict) -> int | None:
    """Trainable parameters from the summary's parameter breakdown, when it has one."""
    parameters = summary.get("parameters")
    return parameters.get("trainable") if isinstance(parameters, dict) else None


def _cell(value: float | int | None, fmt: str = "{:.3f}", absent: str = "-") -> str:
    """A number, or `absent` for None."""
    return absent if value is None else fmt.format(value)


def _stat_cell(value: dict | None, runs: int, fmt: str = "{:.3f}", absent: str = "-") -> str:
    """A pooled cell: the mean, `± std` where several runs gave it, `(n=k)` where fewer than the pool's runs did."""
    if value is None:
        return absent
    text = fmt.format(value["mean"])
    if value["std"] is not None:
        text += "±" + fmt.format(value["std"]).lstrip("+")
    return text + (f" (n={value['n']})" if value["n"] < runs else "")


class Pool:
    """The runs of one table row: their summaries, pooled rows and label."""

    def __init__(self, label: str, paths: Sequence[Path], summaries: Sequence[dict], columns: Sequence[str]):
        self.label, self.paths, self.summaries = label, list(paths), list(summaries)
        self.rows = pooled_rows([comparison_rows(s, columns) for s in summaries])
        self.evaluated = evaluated_columns(summaries, columns)
        self.trainable = _trainable(summaries[0])
        walls = [s.get("wall_seconds") for s in summaries if s.get("wall_seconds") is not None]
        self.wall_seconds = statistics.fmean(walls) if walls else None


def format_table(pools: Sequence[Pool], columns: Sequence[str]) -> str:
    """One table: a row per pool and metric, a column per test set, then average, BWT, parameters, wall time."""
    label_width = max(12, *(len(pool.label) for pool in pools)) + 2
    title_width = max(len(title) for _, title in TABLE_METRICS) + 2
    cells_of = {id(pool): _pool_cells(pool) for pool in pools}
    widths = [max(8, len(name) + 2, *(len(cells_of[id(p)][m][i]) + 2 for p in pools for m in cells_of[id(p)]))
              for i, name in enumerate(list(columns) + ["average", "BWT"])]
    header = ("method".ljust(label_width) + "metric".ljust(title_width)
              + "".join(n.rjust(w) for n, w in zip(list(columns) + ["average", "BWT"], widths))
              + "trainable".rjust(12) + "wall s".rjust(9))
    lines = ["after the last round, on each round's test set (paper rows: the original toolkit's scoring; val rows: "
             "the held-out training samples; pooled runs: mean±std over seeds)", header, "-" * len(header)]
    for pool in pools:
        for index, (metric, title) in enumerate(TABLE_METRICS):
            first = index == 0
            lines.append(
                (pool.label if first else "").ljust(label_width) + title.ljust(title_width)
                + "".join(c.rjust(w) for c, w in zip(cells_of[id(pool)][metric], widths))
                + (_cell(pool.trainable, "{:,}") if first else "").rjust(12)
                + (_cell(pool.wall_seconds, "{:.1f}") if first else "").rjust(9)
            )
    return "\n".join(lines)


def _pool_cells(pool: Pool) -> dict[str, list[str]]:
    """Per metric: the texts of a pool's cells (test sets, average, BWT)."""
    runs = len(pool.summaries)
    cells = {}
    for metric, _ in TABLE_METRICS:
        row = pool.rows.get(metric)
        if row is None:
            cells[metric] = ["-"] * (len(pool.evaluated) + 2)
            continue
        cells[metric] = [_stat_cell(v, runs, absent="n/a" if scored else "-")
                         for v, scored in zip(row["after_last"], pool.evaluated)]
        cells[metric] += [_stat_cell(row["average"], runs, absent="n/a" if any(pool.evaluated) else "-"),
                          _stat_cell(row["backward_transfer"], runs, "{:+.3f}")]
    return cells


def _means(stats: Sequence[dict | None], key: str = "mean") -> list:
    return [None if value is None else value[key] for value in stats]


def comparison_json(pools: Sequence[Pool], columns: Sequence[str]) -> dict:
    """The table's numbers as JSON: per pool, per metric it has, the after-last-round cells by test set (null where
    not evaluated or absent), the average and BWT, each the mean over the pool's runs (a single run's value), with
    the same structure under `std` (null for one run) and `n`."""
    runs = []
    for pool in pools:
        metrics = {}
        for metric, row in pool.rows.items():
            entry = {"after_last": dict(zip(columns, _means(row["after_last"]))),
                     "average": _means([row["average"]])[0],
                     "backward_transfer": _means([row["backward_transfer"]])[0]}
            for key in ("std", "n"):
                entry[key] = {"after_last": dict(zip(columns, _means(row["after_last"], key))),
                              "average": _means([row["average"]], key)[0],
                              "backward_transfer": _means([row["backward_transfer"]], key)[0]}
            metrics[metric] = entry
        runs.append({
            "label": pool.label,
            "method": pool.summaries[0]["method"],
            "summary": str(summary_path(pool.paths[0])),
            "summaries": [str(summary_path(p)) for p in pool.paths],
            "n": len(pool.paths),
            "trainable": pool.trainable,
            "wall_seconds": pool.wall_seconds,
            "metrics": metrics,
        })
    return {"columns": list(columns), "runs": runs}


def plot_comparison(pools: Sequence[Pool], columns: Sequence[str], path: Path) -> None:
    """Bars per metric (test sets and average, after the last round; a pool's bar is its mean, its standard
    deviation the error bar) and the first test set's tool F1 over rounds (a pool's mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4.6 * (len(METRICS) + 1), 4.0))
    groups = list(columns) + ["average"]
    width = 0.8 / len(pools)
    for ax, (metric, title) in zip(axes, METRICS):
        for k, pool in enumerate(pools):
            row = pool.rows[metric]
            cells = row["after_last"] + [row["average"]]
            values = [float("nan") if v is None else v for v in _means(cells)]
            errors = [0.0 if v is None or v["std"] is None else v["std"] for v in cells]
            ax.bar([g + (k - (len(pools) - 1) / 2) * width for g in range(len(groups))], values, width,
                   yerr=errors if any(errors) else None, capsize=2, label=pool.label)
        ax.set_xticks(range(len(groups)), groups, rotation=45 if len(groups) > 5 else 30, ha="right",
                      fontsize="small" if len(groups) > 8 else None)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title} after the last round")
        ax.set_xlabel("test set")
    curve = axes[-1]
    first = columns[0]
    for k, pool in enumerate(pools):
        grids = [s["matrix"]["avg_tool_f1_score"] for s in pool.summaries if first in s["rounds"]]
        if not grids or len(pool.summaries[0]["rounds"]) < 2:
            continue
        column = pool.summaries[0]["rounds"].index(first)
        values = [stat([grid[r][column] for grid in grids if r < len(grid)]) for r in range(len(grids[0]))]
        rounds = [i + 1 for i, v in enumerate(values) if v is not None]
        curve.plot(rounds, [v["mean"] for v in values if v is not None], marker="o", color=f"C{k}")
    rounds_max = max(len(s["rounds"]) for s in (p.summaries[0] for p in pools))
    curve.set_xticks(range(1, rounds_max + 1))
    curve.set_ylim(0, 1.05)
    curve.set_xlabel("after training round")
    curve.set_title(f"tool F1 on test set {first}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(pools), 4))
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(pools) - 1) // 4), 1, 1))
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
    groups = pool_runs(args.runs, summaries)
    labels = run_labels(args.runs, summaries, groups)
    columns = column_names(summaries)
    pools = [Pool(label, [args.runs[i] for i in group], [summaries[i] for i in group], columns)
             for label, group in zip(labels, groups)]
    numbers = comparison_json(pools, columns)
    write_output("--json", json_path, lambda: atomic_write_json(json_path, numbers))
    write_output("--output", args.output, lambda: plot_comparison(pools, columns, args.output))
    print(format_table(pools, columns))
    print(f"plot: {args.output}\nnumbers: {json_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
