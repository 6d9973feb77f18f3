"""What the sequential CLIs share: round specs, per-round data files, and the run directory (config, metrics,
forgetting matrix, summary, plot, resume state)."""

from __future__ import annotations

import fcntl
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import distributed
import round_files
from common import UserError, atomic_write_json, atomic_write_text, atomic_write_with, is_main_process, read_json
from dataset import load_samples

logger = logging.getLogger(__name__)

SUMMARY_METRICS = (
    "avg_tool_f1_score", "avg_f1_score", "exact_accuracy", "tool_accuracy", "parse_error_rate",
    "paper_avg_tool_f1_score", "paper_avg_f1_score", "paper_exact_accuracy", "paper_parse_error_rate",
)
# (metric, title) of the forgetting tables printed at the end of a run
SUMMARY_TABLES = (
    ("avg_tool_f1_score", "tool F1"),
    ("avg_f1_score", "call F1"),
    ("exact_accuracy", "exact match"),
    ("paper_avg_tool_f1_score", "tool F1, paper scoring (sets)"),
    ("paper_avg_f1_score", "call F1, paper scoring (sets, arguments only, exact numbers)"),
)
ROUND_PATTERN = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+)\s*$")
# A round's few hundred samples are learned in 1-10 epochs (the paper uses 1-3); far more only overfits them for hours.
MAX_EPOCHS = 100
# Flags whose values are paths: `data/` and `data` name the same place.
PATH_FLAGS = {"data_dir", "model_name"}
# Flags that may differ between a run and its --resume without changing its numbers.
RESUME_FREE_FLAGS = {"resume", "output_dir", "log_file", "demo", "checkpoint_dir", "eval_batch_size", "shard_backbone",
                     "preflight", "report_to"}
LOCK_FILE = "run.lock"
# Backbone files up to this size are fingerprinted by their SHA-256, larger ones (weight shards) by their size alone.
HASHED_BACKBONE_BYTES = 64 << 20
CURVE_FILE = "training_curve.jsonl"
CURVE_POINT_FIELDS = {"round": int, "global_step": int}
REPORT_TO = ("none", "tensorboard")
# (key of a curve point, panel title) of training_curve.png and the TensorBoard scalars under train/
CURVE_PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"))


@dataclass(frozen=True)
class RoundSpec:
    """One training round: tools start..end (1-based, inclusive ranks) for `epochs` epochs."""

    start: int
    end: int
    epochs: int

    @property
    def name(self) -> str:
        return f"{self.start}-{self.end}"


def parse_training_rounds(text: str) -> list[RoundSpec]:
    """Parse `1-50:1,51-100:3`; malformed, reversed, empty or overlapping ranges are one-line errors."""
    if not text or not text.strip():
        raise UserError("--training_rounds is empty; expected e.g. 1-50:1,51-100:3")
    rounds = []
    for part in text.split(","):
        match = ROUND_PATTERN.match(part)
        if not match:
            raise UserError(f"--training_rounds: {part.strip()!r} is not START-END:EPOCHS (e.g. 1-50:3)")
        start, end, epochs = (int(g) for g in match.groups())
        if start < 1 or end < start:
            raise UserError(f"--training_rounds: range {start}-{end} must satisfy 1 <= start <= end")
        if epochs < 1:
            raise UserError(f"--training_rounds: round {start}-{end} needs at least 1 epoch, got {epochs}")
        if epochs > MAX_EPOCHS:
            raise UserError(f"--training_rounds: round {start}-{end} asks for {epochs} epochs; at most {MAX_EPOCHS} "
                            "are accepted (a round's samples are learned in a few epochs, more only overfit them)")
        rounds.append(RoundSpec(start, end, epochs))
    ordered = sorted(rounds, key=lambda r: r.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start <= before.end:
            raise UserError(f"--training_rounds: ranges {before.name} and {after.name} overlap")
    return rounds


def per_round_values(flag: str, text: str | None, default: int, num_rounds: int) -> list[int]:
    """A per-round list of positive ints (`4,4,3`), or the single default for every round.

    A list shorter than the rounds is padded with its last value (as the original does); a longer one is an error.
    """
    if text is None or text == "":
        return [default] * num_rounds
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if len(values) > num_rounds:
        raise UserError(f"{flag}: {len(values)} values for {num_rounds} rounds")
    if any(v < 1 for v in values):
        raise UserError(f"{flag}: every value must be >= 1, got {text!r}")
    return values + [values[-1]] * (num_rounds - len(values))


def train_file(data_dir: str | Path, spec: RoundSpec, max_calls: int) -> Path:
    return round_files.train_path(data_dir, spec.start, spec.end, max_calls)


def test_file(data_dir: str | Path, spec: RoundSpec, max_calls: int) -> Path:
    return round_files.test_path(data_dir, spec.start, spec.end, max_calls)


def descriptions_file(data_dir: str | Path, spec: RoundSpec) -> Path:
    return round_files.descriptions_path(data_dir, spec.start, spec.end)


def make_data_command(data_dir: str | Path, spec: RoundSpec, train_calls: int, test_calls: int) -> str:
    return round_files.data_command(data_dir, spec.start, spec.end, train_calls, test_calls)


@dataclass
class RoundData:
    """One round's samples and its tool names."""

    spec: RoundSpec
    train: list[dict]
    test: list[dict]
    tools: list[str]
    provenance: dict | None = None  # round_files.read_provenance: the settings that made the files
    validation: list[dict] = field(default_factory=list)  # held out of `train` by --validation_split


def hold_out_validation(round_data: RoundData, share: float, seed: int, round_index: int) -> RoundData:
    """Round data with round(share x training samples) of its training samples (at least one) moved to
    `validation`, drawn from a generator seeded by the seed and the round alone; the test samples are never touched.
    Share 0 leaves the round as it is (the original's behaviour)."""
    if not share:
        return round_data
    train = round_data.train
    count = max(1, round(share * len(train)))
    if count >= len(train):
        raise UserError(f"--validation_split {share}: round {round_data.spec.name} has {len(train)} training "
                        f"sample(s), so holding out {count} leaves none to train on")
    held = set(random.Random(f"validation-{seed}-{round_index}").sample(range(len(train)), count))
    return replace(round_data, train=[s for i, s in enumerate(train) if i not in held],
                   validation=[s for i, s in enumerate(train) if i in held])


def load_round_data(data_dir: str | Path, spec: RoundSpec, train_calls: int, test_calls: int) -> RoundData:
    """Read and validate a round's train and test files; the test set may only name the round's training tools."""
    paths = (train_file(data_dir, spec, train_calls), test_file(data_dir, spec, test_calls))
    for path in paths:
        if not path.is_file():
            raise UserError(
                f"round {spec.name}: data file {path} is missing; make it with: "
                f"{make_data_command(data_dir, spec, train_calls, test_calls)}"
            )
    described = descriptions_file(data_dir, spec)
    allowed = None
    if described.is_file():
        descriptions = read_json(described, "tool descriptions file")
        if not isinstance(descriptions, dict):
            raise UserError(f"tool descriptions file {described}: expected an object keyed by tool name")
        allowed = set(descriptions)
    train = load_samples(paths[0], allowed)
    tools = sorted({t for s in train for t in s["tools"]})
    test = load_samples(paths[1], allowed if allowed is not None else set(tools))
    untrained = sorted({t for s in test for t in s["tools"]} - set(tools))
    if untrained:
        raise UserError(f"round {spec.name}: test file {paths[1]} names tool(s) with no training sample in {paths[0]}: "
                        f"{', '.join(untrained[:5])}")
    provenance = round_files.read_provenance(data_dir, spec.start, spec.end, train_calls, test_calls)
    return RoundData(spec, train, test, tools, provenance)


def single_split_paths(train_data: str | None, test_data: str | None) -> tuple[Path, Path]:
    """The single split's train and test files: the flags' or the original's names in the working directory."""
    return Path(train_data or round_files.SINGLE_TRAIN_FILE), Path(test_data or round_files.SINGLE_TEST_FILE)


def load_single_split(train_data: str | None, test_data: str | None, epochs: int) -> RoundData:
    """The original's single split as one round: the training file's tools in order of first appearance (the round
    `1-N`), its test file naming only those; the files default to the original's names in the working directory."""
    paths = single_split_paths(train_data, test_data)
    for flag, path in zip(("--train_data", "--test_data"), paths):
        if not path.is_file():
            raise UserError(f"{flag} {path} not found (give --train_data and --test_data, or --training_rounds with "
                            "per-round files in --data_dir)")
    if epochs > MAX_EPOCHS:
        raise UserError(f"--epochs {epochs}: at most {MAX_EPOCHS} are accepted")
    train = load_samples(paths[0])
    tools = list(dict.fromkeys(t for s in train for t in s["tools"]))
    test = load_samples(paths[1])
    untrained = sorted({t for s in test for t in s["tools"]} - set(tools))
    if untrained:
        raise UserError(f"--test_data {paths[1]} names tool(s) with no training sample in {paths[0]}: "
                        f"{', '.join(untrained[:5])}")
    return RoundData(RoundSpec(1, len(tools), epochs), train, test, tools)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


DEFAULT_RUNS_ROOT = Path("runs")
PREDICTIONS_DIR = "predictions"


def claim_default_run_dir(method: str, root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """Create `runs/<method>_<timestamp>` exclusively and return it: a run started in the same second as another
    gets `_2`, `_3`, ... so two runs never share a directory."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = f"{method}_{datetime.now().strftime('%Y%m%d_%H%M%S')}"
    for number in itertools.count(1):
        path = root / (stamp if number == 1 else f"{stamp}_{number}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def refuse_existing_run(path: Path) -> None:
    """A new run must not overwrite a run already in its directory (one that wrote its config.json, finished a round
    or not)."""
    if (path / "state.json").exists() or (path / "config.json").exists():
        raise UserError(f"--output_dir {path} already holds a run; pass --resume or another --output_dir")


class RunLock:
    """One process writes a run directory: `acquire` takes an exclusive lock on its `run.lock` (an flock held for the
    process's life, the file naming the holder's pid and host) and `release` (or leaving the `with` block) gives it
    back, removing the file and any directory `acquire` created. A lock left by a process that died is taken over,
    with a warning naming it; one held by a live process is a UserError. Under torchrun process 0 alone locks."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self, run_dir: Path) -> None:
        if self._fd is not None or not is_main_process():
            return
        run_dir = Path(run_dir)
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        self._made = missing
        path = run_dir / LOCK_FILE
        try:
            fd = self._lock(path, run_dir)
        except BaseException:
            self._remove_made()
            raise
        previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if previous:
            logger.warning("%s: taking over the lock of %s, which no longer runs", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd, self.path = fd, path

    @staticmethod
    def _lock(path: Path, run_dir: Path) -> int:
        """Open and flock the lock file; retried when the file was removed by its holder in between."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"--output_dir {run_dir}: cannot create {path} ({err.strerror or err})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"--output_dir {run_dir} is in use by another run ({holder}, {path}); wait for it "
                                "to end or use another --output_dir") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            if self.path is not None and self.path.exists():
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        """Remove the directories `acquire` created, where they stayed empty (a refused run leaves no trace)."""
        for directory in self._made:
            try:
                directory.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def backbone_fingerprint(model_name: str) -> dict[str, str]:
    """What --resume compares of the backbone: each file of its directory (a hub id: its cached snapshot) by SHA-256,
    files over 64 MiB by their size; {"hub id": name} when no local copy is found. A model card (Markdown) is
    documentation, not the backbone, and is left out."""
    directory = Path(model_name).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_name, "config.json")
        except Exception:  # noqa: BLE001 - an id the cache cannot look up is fingerprinted by its name
            cached = None
        if not isinstance(cached, str):
            return {"hub id": model_name}
        directory = Path(cached).parent
    found = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() != ".md"):
        size = path.stat().st_size
        found[path.relative_to(directory).as_posix()] = (
            f"sha256 {round_files.file_sha256(path)}" if size <= HASHED_BACKBONE_BYTES else f"{size} bytes")
    return found


def gguf_digest(inputs: Mapping[str, Any]) -> dict[str, str]:
    """{"sha256": H} of the GGUF file a run's backbone was converted from ("inputs"."gguf"), {} for any other backbone.
    Its path is recorded beside it but not compared: the same file may move."""
    source = inputs.get("gguf")
    return {"sha256": source["sha256"]} if isinstance(source, dict) and "sha256" in source else {}


def data_fingerprint(paths: Sequence[Path]) -> dict[str, str]:
    """Each data file (normalised path) by its SHA-256 and size."""
    return {os.path.normpath(str(p)): f"sha256 {round_files.file_sha256(p)}, {p.stat().st_size} bytes"
            for p in paths if p.is_file()}


def fingerprint_changes(what: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """`what name: old then, new now` for every entry that differs."""
    changes = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"{what}{name}: {old.get(name) or 'absent'} then, {new.get(name) or 'absent'} now")
    return changes


def comparable_flags(values: dict) -> dict:
    """Flag values as --resume compares them: spaces around list separators and round specs, a path's trailing
    slash, and `cuda` for `cuda:0` make no difference."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str):
            if key in PATH_FLAGS:
                value = os.path.normpath(value) if value else value
            else:
                value = re.sub(r"\s*([,:-])\s*", r"\1", value.strip())
            if key == "device" and value == "cuda":
                value = "cuda:0"
        out[key] = value
    return out


def _describe_change(key: str, old: object, new: object) -> str:
    return f"--{key} {json.dumps(old)} then, {json.dumps(new)} now"


class RunDirectory:
    """config.json, metrics.jsonl, state.json (resume point), summary.json and forgetting.png of one run.

    With several processes every one keeps the same records, and process 0 alone writes (distributed.is_main).
    """

    def __init__(self, path: str | Path, method: str, flags: Mapping[str, Any], rounds: Sequence[RoundSpec],
                 resume: bool, checkpoint_dir: str | Path | None = None):
        """`flags`: every flag of the run as parsed, recorded in config.json (its "args") and compared by --resume;
        `checkpoint_dir`: where checkpoints go (default: the run directory's checkpoints/)."""
        self.path = Path(path)
        self.method = method
        self.rounds = list(rounds)
        self.checkpoint_root = Path(checkpoint_dir) if checkpoint_dir else self.path / "checkpoints"
        self.config = {"method": method, "args": _jsonable(flags), "versions": library_versions(),
                       "world_size": distributed.world_size()}
        self.records: list[dict] = []
        self.completed_rounds = 0
        self.elapsed_before = 0.0
        self.started = time.time()
        self.round_stats: list[dict] = []
        self.stored_config: dict = {}  # config.json as a resumed run recorded it
        self.curve: list[dict] = []
        self.tensorboard = None
        if resume:
            self._load_for_resume()
        elif self.writer:
            refuse_existing_run(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / "config.json", self.config)

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (process 0 of a job; a single process always)."""
        return distributed.is_main()

    def _load_for_resume(self) -> None:
        """Read and check config.json, state.json and metrics.jsonl; a damaged file is a UserError naming it."""
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"--resume: {self.path} holds no run (no config.json)")
        stored = read_json(config_path, "run config")
        if not isinstance(stored, dict) or not isinstance(stored.get("args"), dict):
            raise UserError(f"run config {config_path}: expected an object with the run's \"args\"")
        self.stored_config = stored
        for key in ("prompt_sample", "inputs"):
            if key in stored:
                self.config[key] = stored[key]
        mine, theirs = self.config["args"], stored["args"]
        same_mine, same_theirs = comparable_flags(mine), comparable_flags(theirs)
        differing = sorted(k for k in set(mine) | set(theirs)
                           if k not in RESUME_FREE_FLAGS and same_mine.get(k) != same_theirs.get(k))
        if stored.get("method") != self.method or differing:
            what = "; ".join(_describe_change(k, theirs.get(k), mine.get(k)) for k in differing)
            what = what or f"method {stored.get('method')} then, {self.method} now"
            raise UserError(f"--resume: {self.path} was run with a different configuration ({what})")
        state_path = self.path / "state.json"
        if state_path.is_file():
            self._read_state(state_path)
            last = self.completed_rounds - 1
            if last >= 0 and not self.checkpoint_path(last).is_dir():
                raise UserError(f"--resume: {self.path} finished {self.completed_rounds} round(s) but the checkpoint "
                                f"of round {last + 1}, {self.checkpoint_path(last)}, is missing")
        metrics_path = self.path / "metrics.jsonl"
        if metrics_path.is_file():
            records = read_metrics(metrics_path, len(self.rounds))
            self.records = [r for r in records if r["round"] < self.completed_rounds]
        elif self.completed_rounds:
            raise UserError(f"--resume: {metrics_path} is missing, though {state_path} records "
                            f"{self.completed_rounds} finished round(s) whose scores it held; start the run again")
        curve_path = self.path / CURVE_FILE
        if curve_path.is_file():
            points = read_json_lines(curve_path, "training curve", CURVE_POINT_FIELDS)
            self.curve = [p for _, p in points if p["round"] < self.completed_rounds]

    def _read_state(self, path: Path) -> None:
        state = read_json(path, "run state")
        completed = state.get("completed_rounds") if isinstance(state, dict) else None
        if not isinstance(completed, int) or isinstance(completed, bool) or not 0 <= completed <= len(self.rounds):
            raise UserError(f"run state {path}: expected \"completed_rounds\", an integer from 0 to "
                            f"{len(self.rounds)}, got {json.dumps(completed)}")
        wall = state.get("wall_seconds", 0.0)
        stats = state.get("round_stats", [])
        if not isinstance(wall, (int, float)) or isinstance(wall, bool) or not math.isfinite(wall):
            raise UserError(f"run state {path}: \"wall_seconds\" must be a number, got {json.dumps(wall)}")
        if not isinstance(stats, list) or not all(isinstance(s, dict) and isinstance(s.get("round"), int)
                                                  for s in stats):
            raise UserError(f"run state {path}: \"round_stats\" must be a list of objects with a \"round\"")
        self.completed_rounds, self.elapsed_before, self.round_stats = completed, float(wall), list(stats)

    @property
    def finished(self) -> bool:
        """Every round done and the summary written: a --resume has nothing to do and writes nothing."""
        return self.completed_rounds == len(self.rounds) and (self.path / "summary.json").is_file()

    def check_inputs(self, inputs: dict) -> None:
        """A resumed run must read the data files and backbone its config.json recorded (`inputs`: their
        fingerprints now, see data_fingerprint and backbone_fingerprint); a run recorded before fingerprints were
        kept is not checked."""
        stored = self.stored_config.get("inputs")
        if not isinstance(stored, dict):
            return
        changes = fingerprint_changes("data file ", stored.get("data") or {}, inputs["data"])
        changes += fingerprint_changes("backbone file ", stored.get("backbone") or {}, inputs["backbone"])
        changes += fingerprint_changes("backbone GGUF ", gguf_digest(stored), gguf_digest(inputs))
        if changes:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            raise UserError(f"--resume: {self.path} was run on other inputs: {changes[0]}{more}; restore them or "
                            "start a new run")

    def check_prompt(self, prompt: str) -> None:
        """A resumed run must build the prompt its config.json recorded for the first test sample."""
        stored = self.config.get("prompt_sample")
        if stored is not None and stored != prompt:
            at = next((i for i, (a, b) in enumerate(zip(stored, prompt)) if a != b), min(len(stored), len(prompt)))
            raise UserError(f"--resume: {self.path} was run with another prompt (first test sample, from character "
                            f"{at}: was {stored[at:at + 60]!r}, now {prompt[at:at + 60]!r})")

    def record_inputs(self, data: Sequence["RoundData"], prompt: str, inputs: dict | None = None) -> None:
        """Keep in config.json where each round's files came from (their manifest's settings, and whether the files
        still match), the fingerprints of the data files and backbone (`inputs`, compared by --resume) and the exact
        prompt text of the first test sample (checked first, see check_prompt). A finished run's config is left as
        it is."""
        self.check_prompt(prompt)
        if self.finished:
            return
        self.config["data"] = {d.spec.name: d.provenance for d in data}
        if inputs is not None:
            self.config.setdefault("inputs", inputs)
        self.config.setdefault("prompt_sample", prompt)
        if self.writer:
            atomic_write_json(self.path / "config.json", self.config)

    def checkpoint_path(self, round_index: int) -> Path:
        return self.checkpoint_root / f"round_{round_index + 1}"

    def wall_seconds(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def add_metrics(self, round_index: int, test_round: int, metrics: dict, mode: str,
                    predictions: str | None = None, loss: float | None = None) -> None:
        """Record one evaluation: `mode` predicted, ground_truth_tools or validation; `predictions` the file of its
        predictions (relative to the run directory); `loss` the validation loss."""
        self.records.append({
            "round": round_index,
            "round_name": self.rounds[round_index].name,
            "test_round": test_round,
            "test_name": self.rounds[test_round].name,
            "mode": mode,
            "metrics": metrics,
            **({"predictions": predictions} if predictions else {}),
            **({"loss": loss} if loss is not None else {}),
        })

    def report_to(self, target: str) -> None:
        """Also write TensorBoard event files (`tensorboard/` in the run directory) with `target` tensorboard."""
        if target == "tensorboard" and self.writer:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.path / "tensorboard"), purge_step=len(self.curve) + 1)

    def log_step(self, round_index: int, point: dict) -> None:
        """Keep one optimizer step's curve point (training.curve_point) of round `round_index`, numbered over the
        run (`global_step`); written with the round (finish_round), and at once to TensorBoard when on."""
        record = {"round": round_index, "round_name": self.rounds[round_index].name,
                  "global_step": len(self.curve) + 1, **point}
        self.curve.append(record)
        if self.tensorboard is not None:
            for key in ("loss", "data_loss", "prototype_loss", "lr", "grad_norm"):
                if record[key] is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], record["global_step"])

    def predictions_path(self, round_index: int, test_round: int, mode: str) -> Path:
        """Where the predictions of one evaluation go: `predictions/round_R_test_C.jsonl` (R after which round, C the
        test set's name), `_ground_truth_tools` or `validation` in place of `test` for those modes."""
        kind = "validation" if mode == "validation" else "test"
        suffix = "_ground_truth_tools" if mode == "ground_truth_tools" else ""
        name = f"round_{round_index + 1}_{kind}_{self.rounds[test_round].name}{suffix}.jsonl"
        return self.path / PREDICTIONS_DIR / name

    def write_predictions(self, round_index: int, test_round: int, mode: str, predictions: Sequence[dict]) -> str:
        """Write one evaluation's predictions (one JSON object per sample, atomically); the path relative to the
        run directory, which its metrics record names."""
        path = self.predictions_path(round_index, test_round, mode)
        if self.writer:
            atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        return path.relative_to(self.path).as_posix()

    def finish_round(self, round_index: int, stats: dict) -> None:
        """Write metrics and the resume point: the round counts as done only once this returns."""
        self.round_stats = [s for s in self.round_stats if s["round"] < round_index] + [{"round": round_index, **stats}]
        self.completed_rounds = round_index + 1
        if not self.writer:
            return
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        atomic_write_text(self.path / CURVE_FILE, "".join(json.dumps(p) + "\n" for p in self.curve))
        if self.curve:
            plot_curve(self.curve, self.path / "training_curve.png")
        if self.tensorboard is not None:
            for record in self.records:
                if record["round"] == round_index and record["mode"] == "predicted":
                    for metric, _ in SUMMARY_TABLES[:3]:
                        self.tensorboard.add_scalar(f"test_{record['test_name']}/{metric}",
                                                    record["metrics"][metric], round_index + 1)
            self.tensorboard.flush()
        atomic_write_json(self.path / "state.json", {
            "completed_rounds": self.completed_rounds,
            "wall_seconds": self.wall_seconds(),
            "round_stats": self.round_stats,
        })

    def matrix(self, metric: str, mode: str = "predicted") -> list[list[float | None]]:
        n = len(self.rounds)
        grid: list[list[float | None]] = [[None] * n for _ in range(n)]
        for record in self.records:
            if record["mode"] == mode:
                value = record.get("loss") if metric == "loss" else record["metrics"].get(metric)
                grid[record["round"]][record["test_round"]] = value
        return grid

    def summary(self, extra: dict | None = None) -> dict:
        matrices = {m: self.matrix(m) for m in SUMMARY_METRICS}
        summary = {
            "method": self.method,
            "rounds": [r.name for r in self.rounds],
            "matrix": matrices,
            "average_after_last": {m: average_after_last(g) for m, g in matrices.items()},
            "backward_transfer": {m: backward_transfer(g) for m, g in matrices.items()},
            "wall_seconds": round(self.wall_seconds(), 1),
            "round_stats": self.round_stats,
        }
        if any(r["mode"] == "validation" for r in self.records):
            grids = {m: self.matrix(m, "validation") for m in ("loss",) + SUMMARY_METRICS}
            summary["validation"] = {"matrix": grids,
                                     "average_after_last": {m: average_after_last(g) for m, g in grids.items()},
                                     "backward_transfer": {m: backward_transfer(g) for m, g in grids.items()}}
        gt = [r for r in self.records if r["mode"] == "ground_truth_tools"]
        if gt:
            summary["ground_truth_tools_matrix"] = {m: self.matrix(m, "ground_truth_tools") for m in SUMMARY_METRICS}
        summary.update(extra or {})
        return summary

    def write_summary(self, extra: dict | None = None) -> dict:
        summary = self.summary(extra)
        if self.writer:
            atomic_write_json(self.path / "summary.json", summary)
            plot_matrix(summary, self.path / "forgetting.png")
        return summary


METRIC_RECORD_FIELDS = {"round": int, "test_round": int, "mode": str, "metrics": dict}


def read_json_lines(path: Path, what: str, fields: Mapping[str, type]) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSON Lines file the run wrote, each an object with `fields` of their
    types; a damaged line is a UserError naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} cannot be read ({err})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{what} {path} line {number} is not valid JSON ({err.msg}; a line cut short?); "
                            "restore the file or start the run again") from None
        bad = [k for k, kind in fields.items() if not isinstance(record, dict) or not isinstance(record.get(k), kind)]
        if bad:
            raise UserError(f"{what} {path} line {number}: expected an object with {', '.join(bad)} "
                            f"({', '.join(f'{k}: {v.__name__}' for k, v in fields.items())})")
        records.append((number, record))
    return records


def read_metrics(path: Path, num_rounds: int) -> list[dict]:
    """The records of metrics.jsonl, each line checked (read_json_lines), round and test_round within the run's
    rounds."""
    records = []
    for number, record in read_json_lines(path, "run metrics", METRIC_RECORD_FIELDS):
        if not 0 <= record["test_round"] <= record["round"] < num_rounds:
            raise UserError(f"run metrics {path} line {number}: expected round and test_round with 0 <= test_round "
                            f"<= round < {num_rounds}")
        records.append(record)
    return records


def average_after_last(grid: list[list[float | None]]) -> float | None:
    """Mean of the last row over the evaluated test sets."""
    values = [v for v in grid[-1] if v is not None]
    return sum(values) / len(values) if values else None


def backward_transfer(grid: list[list[float | None]]) -> float | None:
    """Mean over c < last of A[last][c] - A[c][c]; None when a needed cell was not evaluated."""
    last = len(grid) - 1
    deltas = [grid[last][c] - grid[c][c] for c in range(last) if grid[last][c] is not None and grid[c][c] is not None]
    return sum(deltas) / len(deltas) if deltas else None


def plot_matrix(summary: dict, path: Path) -> None:
    """Heat maps of tool F1 and call F1: row = after training round r, column = test set of round c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["rounds"]
    metrics = [("avg_tool_f1_score", "tool F1"), ("avg_f1_score", "call F1"), ("exact_accuracy", "exact match")]
    n = len(names)
    side = max(3.6, 0.45 * n + 1.5)  # each cell stays big enough for its number with 10 rounds and more
    small = "small" if n > 5 else None
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.15 * side * len(metrics), side), sharey=True,
                             layout="constrained")
    for ax, (metric, title) in zip(axes, metrics):
        grid = [[float("nan") if v is None else v for v in row] for row in summary["matrix"][metric]]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                if value == value:
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize="x-small" if n > 5 else None,
                            color="white" if value < 0.6 else "black")
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=small)
        ax.set_yticks(range(n), names, fontsize=small)
        ax.set_xlabel("test set of round")
        ax.set_title(f"{summary['method']}: {title}")
    axes[0].set_ylabel("after training round")  # the panels share their rows: one label, left of the first
    fig.colorbar(image, ax=axes, shrink=0.8)

    def save(tmp: str) -> None:
        fig.savefig(tmp, dpi=110, format="png")

    atomic_write_with(path, save)
    plt.close(fig)


def plot_curve(curve: Sequence[dict], path: Path) -> None:
    """training_curve.png: loss (data and prototype parts), learning rate and gradient norm per optimizer step,
    over the whole run, with each round's start marked and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["global_step"] for p in curve]
    fig, axes = plt.subplots(len(CURVE_PANELS), 1, figsize=(9, 2.4 * len(CURVE_PANELS)), sharex=True,
                             layout="constrained")
    for ax, (key, title) in zip(axes, CURVE_PANELS):
        ax.plot(steps, [p[key] for p in curve], linewidth=1, label="data + prototype" if key == "loss" else None)
        if key == "loss" and any(p["prototype_loss"] is not None for p in curve):
            ax.plot(steps, [p["data_loss"] for p in curve], linewidth=1, label="data")
            ax.plot(steps, [p["prototype_loss"] for p in curve], linewidth=1, label="prototype (unweighted)")
            ax.legend(fontsize="small", loc="upper right")
        ax.set_ylabel(title)
        if key == "loss":
            ax.set_yscale("log")
    starts = [p for i, p in enumerate(curve) if i == 0 or p["round"] != curve[i - 1]["round"]]
    for start in starts:
        for ax in axes:
            ax.axvline(start["global_step"] - 0.5, color="grey", linewidth=0.6, linestyle=":")
    top = axes[0].secondary_xaxis("top")
    top.set_xticks([p["global_step"] for p in starts], [p["round_name"] for p in starts],
                   rotation=45 if len(starts) > 5 else 0, fontsize="small", ha="left")
    axes[0].set_title("training curve (rounds start at the dotted lines)")
    axes[-1].set_xlabel("optimizer step")
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def format_summary_table(summary: dict) -> str:
    """The forgetting matrices of tool F1 / call F1 / exact match and of the paper-scoring tool F1 / call F1, each
    with its average after the last round and backward transfer; a matrix the summary lacks is left out."""
    names = summary["rounds"]
    lines = []
    for metric, title in SUMMARY_TABLES:
        if metric not in summary["matrix"]:
            continue
        lines.append(f"{metric}: {title}  (row: after round, column: test set)")
        lines.append("after \\ test " + "".join(f"{n:>10}" for n in names))
        for name, row in zip(names, summary["matrix"][metric]):
            cells = "".join(f"{'-':>10}" if v is None else f"{v:>10.3f}" for v in row)
            lines.append(f"{name:>12} {cells}")
        avg, bwt = summary["average_after_last"].get(metric), summary["backward_transfer"].get(metric)
        lines.append(f"  average after last round: {_fmt(avg)}   backward transfer: {_fmt(bwt)}")
        lines.append("")
    validation = summary.get("validation")
    if validation:
        averages = validation["average_after_last"]
        lines.append("validation (training samples held out by --validation_split), average after the last round: "
                     f"loss {_fmt(averages['loss'])}, tool F1 {_fmt(averages['avg_tool_f1_score'])}, call F1 "
                     f"{_fmt(averages['avg_f1_score'])}, exact {_fmt(averages['exact_accuracy'])}")
    lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _jsonable(values: Mapping[str, Any]) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)) for k, v in values.items()}


def print_final_report(run: RunDirectory, summary: dict) -> None:
    """Print the last round's metric tables and the forgetting summary (the CLI's final result)."""
    from eval import format_metrics_table

    last = len(run.rounds) - 1
    for record in run.records:
        if record["round"] == last and record["mode"] == "predicted":
            print(f"\nafter the last round, test set {record['test_name']}:")
            print(format_metrics_table(record["metrics"]))
    print()
    print(format_summary_table(summary))
    print(f"run directory: {run.path}")
