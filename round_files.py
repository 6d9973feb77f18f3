"""A round's data files in one place: their names, the command that makes them, and where they came from.

Tools `start-end` (1-based, inclusive ranks) have three files under a data directory (the names of docs/DESIGN.md):

    training/function_calling_train_tools{start}-{end}_{k}calls.json
    test/function_calling_test_tools{start}-{end}_{k}calls.json
    tool_descriptions_tools{start}-{end}.json

and, when xlam_datasets.py made them, a manifest `manifest_tools{start}-{end}.json` beside the descriptions: the
settings that made the files and each file's SHA-256, so that stale files can be told from current ones.

Shell scripts ask this module for a name rather than spelling it:

    python3 round_files.py --data_dir data --start 1 --end 20 --test_max_function_calls 3
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any, NamedTuple

from common import CliParser, atomic_write_json, positive_int, run_cli

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
TRAIN_DIR = "training"
TEST_DIR = "test"
TEST_FILE_PATTERN = re.compile(r"^function_calling_test_tools(\d+)-(\d+)_(\d+)calls\.json$")


class RoundPaths(NamedTuple):
    """The three data files of one round."""

    train: Path
    test: Path
    descriptions: Path


# The original's single split: one pair of files in the working directory (--train_data / --test_data defaults).
SINGLE_TRAIN_FILE = "function_calling_train.json"
SINGLE_TEST_FILE = "function_calling_test.json"


def range_name(start: int, end: int) -> str:
    return f"{start}-{end}"


def train_path(data_dir: str | Path, start: int, end: int, max_calls: int) -> Path:
    return Path(data_dir) / TRAIN_DIR / f"function_calling_train_tools{start}-{end}_{max_calls}calls.json"


def train_paths_of_range(data_dir: str | Path, start: int, end: int) -> list[Path]:
    """The training files of tools start-end under a data directory, whatever their call cap, by cap."""
    pattern = re.compile(rf"^function_calling_train_tools{start}-{end}_(\d+)calls\.json$")
    folder = Path(data_dir) / TRAIN_DIR
    found = [(int(m[1]), path) for path in folder.glob("*.json") if (m := pattern.match(path.name))] \
        if folder.is_dir() else []
    return [path for _, path in sorted(found)]


def test_path(data_dir: str | Path, start: int, end: int, max_calls: int) -> Path:
    return Path(data_dir) / TEST_DIR / f"function_calling_test_tools{start}-{end}_{max_calls}calls.json"


def descriptions_path(data_dir: str | Path, start: int, end: int) -> Path:
    return Path(data_dir) / f"tool_descriptions_tools{start}-{end}.json"


def manifest_path(data_dir: str | Path, start: int, end: int) -> Path:
    return Path(data_dir) / f"manifest_tools{start}-{end}.json"


def round_paths(data_dir: str | Path, start: int, end: int, train_calls: int, test_calls: int) -> RoundPaths:
    return RoundPaths(train_path(data_dir, start, end, train_calls), test_path(data_dir, start, end, test_calls),
                      descriptions_path(data_dir, start, end))


def parse_test_path(path: str | Path) -> tuple[Path, int, int, int] | None:
    """(data directory, start, end, call cap) of a test file with the docs/DESIGN.md name; None for any other name."""
    path = Path(path)
    match = TEST_FILE_PATTERN.match(path.name)
    if not match:
        return None
    return path.parent.parent, int(match[1]), int(match[2]), int(match[3])


def data_command(data_dir: str | Path, start: int, end: int, train_calls: int | None = None,
                 test_calls: int | None = None) -> str:
    """The xlam_datasets.py command that writes a round's files (a cap left None is not passed)."""
    parts = ["python", "xlam_datasets.py", "--top_k", range_name(start, end)]
    if train_calls is not None:
        parts += ["--train_max_function_calls", str(train_calls)]
    if test_calls is not None:
        parts += ["--test_max_function_calls", str(test_calls)]
    parts += ["--output_dir", str(data_dir)]
    return " ".join(shlex.quote(part) for part in parts)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def write_manifest(data_dir: str | Path, start: int, end: int, settings: dict[str, Any], paths: RoundPaths,
                   info: dict[str, Any] | None = None) -> Path:
    """Record `settings` (compared on reuse), `info` (not compared) and the SHA-256 of the round's three files.

    Write it after the files: a file replaced later no longer matches its recorded digest.
    """
    root = Path(data_dir)
    files = {kind: {"path": path.relative_to(root).as_posix(), "sha256": file_sha256(path)}
             for kind, path in paths._asdict().items()}
    path = manifest_path(data_dir, start, end)
    atomic_write_json(path, {"version": MANIFEST_VERSION, "range": range_name(start, end), "settings": settings,
                             "info": info or {}, "files": files})
    return path


def read_manifest(data_dir: str | Path, start: int, end: int) -> dict | None:
    """The round's manifest, or None when there is none or it cannot be read as one."""
    path = manifest_path(data_dir, start, end)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s cannot be read as a manifest; treating the round's files as of unknown origin", path)
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict) \
            or not isinstance(manifest.get("files"), dict):
        logger.warning("%s is not a manifest of this toolkit; treating the round's files as of unknown origin", path)
        return None
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def setting_changes(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`name old -> new` for every setting that differs (keys of either side)."""
    changes = []
    for key in sorted(set(recorded) | set(wanted)):
        if recorded.get(key) != wanted.get(key):
            changes.append(f"{key} {_short(recorded.get(key))} -> {_short(wanted.get(key))}")
    return changes


def file_changes(data_dir: str | Path, manifest: dict, paths: RoundPaths) -> list[str]:
    """What about the round's files disagrees with the manifest: a missing file, another file, other content."""
    problems = []
    for kind, path in paths._asdict().items():
        entry = manifest["files"].get(kind)
        relative = path.relative_to(data_dir).as_posix()
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(f"the manifest records no {kind} file")
        elif entry.get("path") != relative:
            problems.append(f"the manifest describes {kind} file {entry.get('path')}, not {relative}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{path} changed since it was made")
    return problems


def stale_reasons(data_dir: str | Path, start: int, end: int, settings: dict[str, Any],
                  paths: RoundPaths) -> list[str]:
    """Why a round's files are not the ones `settings` would make (empty: they are)."""
    manifest = read_manifest(data_dir, start, end)
    missing = [f"{path} is missing" for path in paths if not path.is_file()]
    if missing:
        return missing
    if manifest is None:
        return [f"no manifest {manifest_path(data_dir, start, end)} says how they were made"]
    changes = setting_changes(manifest["settings"], settings)
    if changes:
        return ["settings changed: " + "; ".join(changes)]
    return file_changes(data_dir, manifest, paths)


def read_provenance(data_dir: str | Path, start: int, end: int, train_calls: int, test_calls: int) -> dict:
    """Where a round's files came from, for a run's config.json.

    {"manifest": path or None, "settings": what made the files or None, "files_match": whether the files on disk
    are those the manifest describes, "problems": what disagrees}.
    """
    paths = round_paths(data_dir, start, end, train_calls, test_calls)
    manifest = read_manifest(data_dir, start, end)
    if manifest is None:
        return {"manifest": None, "settings": None, "files_match": False,
                "problems": ["no manifest (files not made by xlam_datasets.py, or made before manifests existed)"]}
    problems = file_changes(data_dir, manifest, paths)
    return {"manifest": str(manifest_path(data_dir, start, end)), "settings": manifest["settings"],
            "files_match": not problems, "problems": problems}


def build_parser() -> CliParser:
    parser = CliParser(description="Print the path of a round's test file (for the shell scripts).")
    parser.add_argument("--data_dir", default="data", help="where the rounds' files are")
    parser.add_argument("--start", type=positive_int, required=True, help="first tool rank of the round (required, no default)")
    parser.add_argument("--end", type=positive_int, required=True, help="last tool rank of the round (required, no default)")
    parser.add_argument("--test_max_function_calls", type=positive_int, required=True,
                        help="the k of the test file's _{k}calls name (required, no default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(test_path(args.data_dir, args.start, args.end, args.test_max_function_calls))
    return 0


if __name__ == "__main__":
    run_cli(main)
