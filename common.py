"""Small pieces every CLI of the toolkit shares: one-line user errors, atomic writes, JSON reading, logging, seeding."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

logger = logging.getLogger("tokmem")
_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """Bad input from the user (a flag, a file, a field): reported as one line and exit status 2."""


class JobFailed(Exception):
    """A job of several processes cannot go on (another process died or did not answer in time): reported as one
    line and exit status 1."""


class WriteFailed(Exception):
    """A file could not be written (a full disk, a permission error): reported as one line naming the path and the OS
    error, exit status 1."""


def write_failure(err: OSError, path: str | os.PathLike) -> WriteFailed:
    """The WriteFailed of an OSError met while writing `path`."""
    return WriteFailed(f"cannot write {path}: {err.strerror or err}")


def is_main_process() -> bool:
    """Whether this is process 0 of a torchrun job (RANK unset or 0), the one that reports a bad input: every process
    reads the same input and would report the same line."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, unless its help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower():
            return text
        if action.nargs == 0 and action.default is False:
            return f"{text} (default: off)"
        return super()._get_help_string(action)


class CliParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage block) and exits with status 2; --help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if is_main_process():
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI entry point; a UserError becomes `prog: error: message` on stderr and exit status 2 (written by process
    0 alone under torchrun), a JobFailed the same line from each process that meets it and exit status 1."""
    prog = Path(sys.argv[0]).name
    try:
        code = main(argv)
    except UserError as err:
        if is_main_process():
            sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(2)
    except (JobFailed, WriteFailed) as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(130)
    sys.exit(code or 0)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same directory, then rename: the final name never holds a partial file.
    An OSError (a full disk, a permission error) is a WriteFailed naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_failure(err, path) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_failure(err, path) from None
        raise


def check_writable(path: str | os.PathLike, flag: str, kind: str = "dir") -> None:
    """Refuse, before any work, an output place that cannot be written: `kind` "dir" (a directory to create or fill)
    or "file" (a file to create or replace). A file where a directory goes (or the reverse), a file among the parents
    or a place without write permission is a UserError naming the flag; nothing is created."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory")
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path} is a directory, not a file")
    place = path if kind == "dir" else path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{flag} {path}: {place} is a file, so nothing can be created under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check.", suffix=".tmp", dir=place)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {place} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write an object as JSON."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Atomically write a file produced by `writer(tmp_path)` (for savers that take a path, e.g. safetensors)."""
    _atomic_write(path, writer)


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """An exclusive file lock next to `target` (`.<name>.lock`), so that two processes never build it at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished `source` directory into place at `target` (same file system), discarding what was there."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; a missing or malformed file is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} cannot be read ({err})") from None


def read_safetensors(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a safetensors file into CPU tensors; a truncated, empty or foreign file is a UserError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own errors (and OSError) on a damaged file
        text = str(err).strip().splitlines()
        raise UserError(f"{what} {path} is damaged or not a safetensors file "
                        f"({text[0] if text else type(err).__name__})") from None


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO, prefix: str = "") -> None:
    """Log to stderr and, when given, to a file, each line after `prefix`; calling it again replaces the handlers."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _HoldingHandler(logging.Handler):
    """Keeps every record it is given, for `hold_logs`."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def hold_logs() -> Iterator[None]:
    """Hold back log records while a CLI checks its input against its data: when the block ends normally they are
    passed on in order; when it raises they are dropped, so a refusal stays its one error line."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    holder = _HoldingHandler()
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(holder)
    try:
        yield
    finally:
        root.removeHandler(holder)
        for handler in handlers:
            root.addHandler(handler)
    for record in holder.records:
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _number_flag(convert: Callable[[str], Any], accepts: Callable[[Any], bool], expected: str,
                 name: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, and refuse it unless `accepts` it, saying what was `expected`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"argparse type: {expected}."
    return parse


def _finite(value: float) -> bool:
    return value != float("inf")


positive_int = _number_flag(int, lambda v: v > 0, "a positive integer", "positive_int")
non_negative_int = _number_flag(int, lambda v: v >= 0, "an integer >= 0", "non_negative_int")
positive_float = _number_flag(float, lambda v: v > 0 and _finite(v), "a positive number", "positive_float")
non_negative_float = _number_flag(float, lambda v: v >= 0 and _finite(v), "a number >= 0", "non_negative_float")
unit_interval = _number_flag(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "unit_interval")
