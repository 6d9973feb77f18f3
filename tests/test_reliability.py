"""Reliability of the four CLIs: every bad input is one `prog: error: ...` line naming the culprit with exit status 2
and no traceback; resume and replay batches of the LoRA baseline; nothing loads or writes pickles.

The bad-input tables run each CLI as a script, in a temporary working directory, through tests/cli_forkserver.py: one
interpreter imports torch, transformers and peft once and forks a child per case, so a case costs milliseconds, not
the seconds of a fresh import. `xlam_datasets.py` imports none of them and runs as a plain subprocess. The server's
own stderr must stay empty (imports print nothing), and one case of TokMem and of ICL also runs in a fresh interpreter.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import lora_sequential
from conftest import (REPO_ROOT, TrainingRecorder, assert_files_complete, assert_no_pickle_files, numbers,
                      run_in_process, write_round_files)

ROUND_1 = ["get_weather", "convert_currency", "search_flights"]
ROUND_2 = ["calculate_bmi", "book_table", "translate_text"]
TRAIN_1 = "training/function_calling_train_tools1-3_4calls.json"
TEST_1 = "test/function_calling_test_tools1-3_4calls.json"
TEST_2 = "test/function_calling_test_tools4-6_4calls.json"
TRAIN_2 = "training/function_calling_train_tools4-6_4calls.json"
DESCRIPTIONS_1 = "tool_descriptions_tools1-3.json"
HEAVY_MODULES = ("main_sequential", "lora_sequential", "icl_baseline")
CASE_TIMEOUT = 120


# ---------------------------------------------------------------------------------------------------------------------
# Running a CLI


class ForkServer:
    """Client of tests/cli_forkserver.py: run a CLI script in a forked child of a pre-imported interpreter."""

    def __init__(self, modules: tuple[str, ...], log: Path):
        self.log = log
        self._stderr = open(log, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tests" / "cli_forkserver.py"), *modules], cwd=REPO_ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        ready = self.process.stdout.readline()
        assert ready and json.loads(ready) == {"ready": True}, log.read_text()

    def run(self, script: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
        request = {"script": str(REPO_ROOT / script), "argv": argv, "cwd": str(cwd), "timeout": CASE_TIMEOUT}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the fork server died: {self.log.read_text()[-2000:]}"
        reply = json.loads(line)
        return subprocess.CompletedProcess([script, *argv], reply["returncode"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self._stderr.close()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory) -> Iterator[ForkServer]:
    server = ForkServer(HEAVY_MODULES, tmp_path_factory.mktemp("fork_server") / "stderr.log")
    try:
        yield server
    finally:
        server.close()


def run_fresh(script: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a CLI in a fresh interpreter, as a user does."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=CASE_TIMEOUT)


def assert_one_line_error(result: subprocess.CompletedProcess, script: str, expected: tuple[str, ...]) -> str:
    """Exit status 2, and stderr is exactly one `script: error: ...` line holding every expected substring."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, f"exit status {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{result.stderr[-3000:]}"
    line = lines[0]
    assert line.startswith(f"{script}: error: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


# ---------------------------------------------------------------------------------------------------------------------
# The tables: (case id, argv, file setup, expected substrings of the error line)


@dataclass
class Context:
    """A case's places and runner: `{tmp}`, `{data}`, `{model}` and `{out}` in argv and expected texts stand for the
    places; `run(extra)` runs the CLI with its base argv plus `extra`, in {tmp}."""

    tmp: Path
    model: Path
    base: list[str]
    runner: Callable[[list[str], Path], subprocess.CompletedProcess]

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, data=self.data, model=self.model, out=self.out)

    def run(self, extra: list[str]) -> subprocess.CompletedProcess:
        return self.runner([self.fill(a) for a in self.base + extra], self.tmp)


Setup = Callable[[Context], None]


@dataclass(frozen=True)
class Case:
    """One bad input: argv (appended to the CLI's base argv; a repeated flag's last value wins), the files to break,
    and the substrings the error line must hold."""

    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    setup: tuple[Setup, ...] = field(default=())


def case(case_id: str, argv: list[str], expect: str | list[str], *setup: Setup) -> pytest.param:
    expected = (expect,) if isinstance(expect, str) else tuple(expect)
    return pytest.param(Case(case_id, tuple(argv), expected, setup), id=case_id)


def write_text(relative: str, text: str) -> Setup:
    """Replace a data file's text."""

    def apply(ctx: Context) -> None:
        (ctx.data / relative).write_text(text)

    return apply


def edit_rows(relative: str, edit: Callable[[list[dict]], list[dict]]) -> Setup:
    """Rewrite a data file's rows through `edit`."""

    def apply(ctx: Context) -> None:
        path = ctx.data / relative
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return apply


def drop_field(name: str, row: int = 1) -> Callable[[list[dict]], list[dict]]:
    def edit(rows: list[dict]) -> list[dict]:
        del rows[row][name]
        return rows

    return edit


def extra_call(rows: list[dict]) -> list[dict]:
    rows[0]["function_calls"].append('{"city": "Oslo"}')
    return rows


def foreign_tool(rows: list[dict]) -> list[dict]:
    rows[0]["tools"][0] = "book_table"
    return rows


def remove(relative: str) -> Setup:
    def apply(ctx: Context) -> None:
        (ctx.data / relative).unlink()

    return apply


def empty_model_dir(ctx: Context) -> None:
    (ctx.tmp / "empty_model").mkdir()


def corrupt_model_weights(ctx: Context) -> None:
    """A copy of the tiny model whose weights file is garbage: the tokenizer loads, the model does not."""
    target = ctx.tmp / "broken_model"
    shutil.copytree(ctx.model, target)
    (target / "model.safetensors").write_bytes(b"this is not a safetensors file")


def earlier_run(argv: list[str]) -> Setup:
    """A finished one-round run in {out}, made with `argv` appended to the CLI's base argv."""

    def apply(ctx: Context) -> None:
        result = ctx.run(list(argv))
        assert result.returncode == 0, result.stderr[-2000:]

    return apply


def earlier_icl_run(ctx: Context) -> None:
    """{out} already holds an in-context run's results."""
    ctx.out.mkdir()
    (ctx.out / "results.json").write_text("{}")


def a_file(name: str) -> Setup:
    """{tmp}/<name> is a plain file (where a directory, or the parent of one, is expected)."""

    def apply(ctx: Context) -> None:
        (ctx.tmp / name).write_text("not a directory")

    return apply


def a_dir(name: str) -> Setup:
    def apply(ctx: Context) -> None:
        (ctx.tmp / name).mkdir()

    return apply


def long_answers(relative: str) -> Setup:
    """Every training sample of a file gets an answer of about 300 tokens."""

    def edit(rows: list[dict]) -> list[dict]:
        for row in rows:
            row["function_calls"] = [json.dumps({"notes": "word " * 300})]
        return rows

    return edit_rows(relative, edit)


def remove_checkpoints(ctx: Context) -> None:
    shutil.rmtree(ctx.out / "checkpoints")


def break_state(ctx: Context) -> None:
    (ctx.out / "state.json").write_text('{"completed_rounds": ')


def unfinish(ctx: Context) -> None:
    """Remove a finished run's summary.json: a --resume then loads the last checkpoint to write it again."""
    (ctx.out / "summary.json").unlink()


def run_file(relative: str, content: bytes | Callable[[bytes], bytes]) -> Setup:
    """Replace a file of the run directory: by `content`, or by `content(old bytes)`."""

    def apply(ctx: Context) -> None:
        path = ctx.out / relative
        path.write_bytes(content(path.read_bytes()) if callable(content) else content)

    return apply


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def foreign_rows(ctx: Context) -> None:
    """The checkpoint's rows replaced by a well-formed safetensors file of another model (7 rows of width 5)."""
    from safetensors.torch import save_file

    save_file({"input_rows": torch.zeros(7, 5)}, str(ctx.out / MEMORY))


def copied_model(ctx: Context) -> None:
    shutil.copytree(ctx.model, ctx.tmp / "model_copy")


def edit_model_config(ctx: Context) -> None:
    """The copied backbone's config.json gains a key: a changed backbone that still loads."""
    path = ctx.tmp / "model_copy" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "note": "edited"}))


MEMORY = "checkpoints/round_1/tool_memory.safetensors"
MEMORY_META = "checkpoints/round_1/tool_memory.json"
ADAPTER = "checkpoints/round_1/lora/adapter_model.safetensors"
MISSING_MODEL = ["--model_name", "{tmp}/no_such_model"]
ONE_ROUND = ["--training_rounds", "1-3:1"]
UNWRITABLE = "/sys/tokmem_run"  # /sys refuses new entries, to root as well
NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")

# What both sequential CLIs (TokMem and the LoRA baseline) must refuse; they read rounds and data the same way.
SEQUENTIAL_CASES = [
    case("rounds-malformed", ["--training_rounds", "1-3"], "--training_rounds: '1-3' is not START-END:EPOCHS"),
    case("rounds-not-numbers", ["--training_rounds", "one-three:1"], "--training_rounds: 'one-three:1'"),
    case("rounds-reversed", ["--training_rounds", "3-1:1"], "--training_rounds: range 3-1"),
    case("rounds-overlapping", ["--training_rounds", "1-3:1,3-6:1"], "--training_rounds: ranges 1-3 and 3-6 overlap"),
    case("rounds-empty", ["--training_rounds", ""], "--training_rounds is empty"),
    case("rounds-blank-part", ["--training_rounds", "1-3:1,"], "--training_rounds: '' is not START-END:EPOCHS"),
    case("rounds-zero-epochs", ["--training_rounds", "1-3:0"], "--training_rounds: round 1-3 needs at least 1 epoch"),
    case("train-caps-too-many", ["--train_max_function_calls_per_round", "4,4,4"],
         "--train_max_function_calls_per_round: 3 values for 2 rounds"),
    case("train-caps-not-integers", ["--train_max_function_calls_per_round", "4,four"],
         ["--train_max_function_calls_per_round", "integers", "'4,four'"]),
    case("test-caps-not-integers", ["--test_max_function_calls_per_round", "4,2.5"],
         ["--test_max_function_calls_per_round", "integers", "'4,2.5'"]),
    case("test-caps-zero", ["--test_max_function_calls_per_round", "4,0"],
         "--test_max_function_calls_per_round: every value must be >= 1"),
    case("train-file-missing", [], ["round 1-3", "{data}/" + TRAIN_1, "is missing",
                                    "make it with: python xlam_datasets.py --top_k 1-3"], remove(TRAIN_1)),
    case("test-file-missing", [], ["round 4-6", "{data}/" + TEST_2, "python xlam_datasets.py --top_k 4-6"],
         remove(TEST_2)),
    case("caps-name-missing-files", ["--train_max_function_calls_per_round", "4,3"],
         ["function_calling_train_tools4-6_3calls.json", "--train_max_function_calls 3"]),
    case("data-not-json", [], ["{data}/" + TRAIN_1, "is not valid JSON"], write_text(TRAIN_1, "{not json")),
    case("data-zero-bytes", [], ["{data}/" + TEST_1, "is not valid JSON"], write_text(TEST_1, "")),
    case("data-not-a-list", [], ["{data}/" + TRAIN_1, "expected a JSON list of samples, got dict"],
         write_text(TRAIN_1, '{"user_input": "hi", "tools": [], "function_calls": []}')),
    case("data-row-not-object", [], ["{data}/" + TRAIN_1, "row 0", "expected an object"],
         write_text(TRAIN_1, '["just a string"]')),
    case("row-without-user_input", [], ["{data}/" + TRAIN_1, "row 1", "missing field 'user_input'"],
         edit_rows(TRAIN_1, drop_field("user_input"))),
    case("row-without-tools", [], ["{data}/" + TEST_1, "row 1", "missing field 'tools'"],
         edit_rows(TEST_1, drop_field("tools"))),
    case("row-without-function_calls", [], ["{data}/" + TRAIN_1, "row 1", "missing field 'function_calls'"],
         edit_rows(TRAIN_1, drop_field("function_calls"))),
    case("tools-and-calls-differ", [], ["{data}/" + TRAIN_1, "row 0", "1 tools but 2 function_calls"],
         edit_rows(TRAIN_1, extra_call)),
    case("tool-outside-round-test", [], ["{data}/" + TEST_1, "row 0", "'book_table' is not one of this round's tools"],
         edit_rows(TEST_1, foreign_tool)),
    case("tool-outside-round-train", [], ["{data}/" + TRAIN_1, "row 0", "'book_table' is not one of this round's"],
         edit_rows(TRAIN_1, foreign_tool)),
    case("data-empty", [], ["{data}/" + TEST_2, "holds no samples"], write_text(TEST_2, "[]")),
    case("descriptions-not-object", [], ["{data}/" + DESCRIPTIONS_1, "expected an object"],
         write_text(DESCRIPTIONS_1, "[]")),
    case("model-dir-missing", MISSING_MODEL, "--model_name '{tmp}/no_such_model': the directory does not exist"),
    case("model-gguf-missing", ["--model_name", "{tmp}/no_such.gguf"],
         "--model_name {tmp}/no_such.gguf: the GGUF file does not exist"),
    case("model-dir-empty", ["--model_name", "{tmp}/empty_model"], "--model_name '{tmp}/empty_model'",
         empty_model_dir),
    case("model-weights-unreadable", ["--model_name", "{tmp}/broken_model"],
         "cannot load --model_name '{tmp}/broken_model'", corrupt_model_weights),
    case("model-name-a-file", ["--model_name", "{tmp}/weights"], "--model_name '{tmp}/weights' is a file",
         a_file("weights")),
    case("output-dir-a-file", ["--output_dir", "{tmp}/taken"], "--output_dir {tmp}/taken is a file, not a directory",
         a_file("taken")),
    case("output-dir-under-a-file", ["--output_dir", "{tmp}/taken/run"],
         "--output_dir {tmp}/taken/run: {tmp}/taken is a file", a_file("taken")),
    case("output-dir-not-writable", ["--output_dir", UNWRITABLE], f"--output_dir {UNWRITABLE}: cannot write in /sys"),
    case("default-runs-dir-a-file", ["--output_dir", ""], "--output_dir (default: runs/<method>_<timestamp>) runs is a file",
         a_file("runs")),
    case("log-file-a-directory", ["--log_file", "{tmp}/logs"], "--log_file {tmp}/logs is a directory", a_dir("logs")),
    case("log-file-under-a-file", ["--log_file", "{tmp}/taken/train.log"],
         "--log_file {tmp}/taken/train.log: {tmp}/taken is a file", a_file("taken")),
    case("log-file-not-writable", ["--log_file", UNWRITABLE + "/train.log"], "--log_file /sys/tokmem_run/train.log"),
    case("checkpoint-dir-a-file", ["--checkpoint_dir", "{tmp}/taken"], "--checkpoint_dir {tmp}/taken is a file",
         a_file("taken")),
    case("checkpoint-dir-under-a-file", ["--checkpoint_dir", "{tmp}/taken/ckpt"], "--checkpoint_dir {tmp}/taken/ckpt: ",
         a_file("taken")),
    case("checkpoint-dir-not-writable", ["--checkpoint_dir", UNWRITABLE], "--checkpoint_dir /sys/tokmem_run: cannot write"),
    case("max-length-beyond-positions", ["--max_length", "4096"],
         "--max_length 4096 is beyond the 1024 positions of --model_name {model}"),
    case("test-prompt-plus-answer-beyond-positions", ["--max_new_tokens", "1020"],
         ["round 1-3: a test prompt of", "--max_new_tokens 1020 passes the model's 1024 positions"]),
    case("every-answer-too-long", ["--max_length", "256"], ["round 4-6: the answer of every one of its 12 training samples fills "
                                       "--max_length 256"], long_answers(TRAIN_2)),
    pytest.param(Case("cuda-missing", ("--device", "cuda"), ("--device cuda: CUDA is not available",)),
                 id="cuda-missing", marks=NO_CUDA),
    case("demo-negative", ["--demo", "-1"], "argument --demo: expected an integer >= 0, got '-1'"),
    case("epochs-absurd", ["--training_rounds", "1-3:1,4-6:100000"],
         ["round 4-6 asks for 100000 epochs; at most 100 are accepted", "more only overfit"]),
    case("resume-no-output-dir", ["--resume", "--output_dir", ""], "--resume needs --output_dir"),
    case("resume-no-run", ["--resume"], ["--resume", "{out}", "holds no run"]),
    case("batch-size-zero", ["--batch_size", "0"], "argument --batch_size: expected a positive integer, got '0'"),
    case("batch-size-negative", ["--batch_size", "-4"], "argument --batch_size: expected a positive integer"),
    case("batch-size-not-a-number", ["--batch_size", "four"], "argument --batch_size"),
    case("eval-batch-size-zero", ["--eval_batch_size", "0"], "argument --eval_batch_size"),
    case("grad-accumulation-zero", ["--gradient_accumulation_steps", "0"], "argument --gradient_accumulation_steps"),
    case("lr-zero", ["--lr", "0"], "argument --lr: expected a positive number, got '0'"),
    case("lr-negative", ["--lr", "-0.001"], "argument --lr: expected a positive number, got '-0.001'"),
    case("lr-nan", ["--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
    case("lr-infinite", ["--lr", "inf"], "argument --lr: expected a positive number, got 'inf'"),
    case("max-new-tokens-zero", ["--max_new_tokens", "0"], "argument --max_new_tokens"),
    case("unknown-flag", ["--learning_rate", "0.1"], "unrecognized arguments: --learning_rate"),
]

MAIN_BASE = ["--model_name", "{model}", "--training_rounds", "1-3:1,4-6:1", "--data_dir", "{data}", "--output_dir",
             "{out}", "--device", "cpu", "--batch_size", "4", "--eval_batch_size", "4", "--max_new_tokens", "4"]
MAIN_CASES = SEQUENTIAL_CASES + [
    case("lora-lr-zero", ["--lora_lr", "0"], "argument --lora_lr: expected a positive number"),
    case("lora-dropout-one", ["--use_lora", "--lora_dropout", "1"], "--lora_dropout: expected a number in [0, 1)"),
    case("lora-target-unknown", ["--use_lora", "--lora_target_modules", "no_such_proj"],
         ["--lora_target_modules: ", "no_such_proj", "the model's modules LoRA can adapt: down_proj, embed_tokens, "
          "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"]),
    case("freeze-lora-without-lora", ["--freeze_lora_after_first"], "--freeze_lora_after_first needs --use_lora"),
    case("lora-layer-outside", ["--use_lora", "--lora_layer_indices", "5"], "--lora_layer_indices: 5 is outside"),
    case("lora-layers-not-integers", ["--use_lora", "--lora_layer_indices", "last"],
         "--lora_layer_indices: expected comma-separated integers"),
    case("resume-different-configuration", ONE_ROUND + ["--batch_size", "2", "--resume"],
         ["--resume", "{out}", "different configuration (--batch_size 4 then, 2 now)"], earlier_run(ONE_ROUND)),
    case("resume-checkpoint-missing", ONE_ROUND + ["--resume"], ["--resume", "{out}/checkpoints/round_1", "missing"],
         earlier_run(ONE_ROUND), remove_checkpoints),
    case("resume-state-corrupt", ONE_ROUND + ["--resume"], "run state {out}/state.json is not valid JSON",
         earlier_run(ONE_ROUND), break_state),
    case("resume-state-empty-object", ONE_ROUND + ["--resume"],
         'run state {out}/state.json: expected "completed_rounds", an integer from 0 to 1, got null',
         earlier_run(ONE_ROUND), run_file("state.json", b"{}")),
    case("resume-train-file-changed", ONE_ROUND + ["--resume"],
         ["--resume: {out} was run on other inputs: data file {data}/" + TRAIN_1 + ": sha256 ", " bytes then, sha256 ",
          " bytes now"], earlier_run(ONE_ROUND), edit_rows(TRAIN_1, lambda rows: rows[:8])),
    case("resume-backbone-changed", ONE_ROUND + ["--model_name", "{tmp}/model_copy", "--resume"],
         ["--resume: {out} was run on other inputs: backbone file config.json: sha256 ", "then, sha256 "],
         copied_model, earlier_run(ONE_ROUND + ["--model_name", "{tmp}/model_copy"]), edit_model_config),
    case("resume-metrics-missing", ONE_ROUND + ["--resume"],
         "--resume: {out}/metrics.jsonl is missing, though {out}/state.json records 1 finished round(s)",
         earlier_run(ONE_ROUND), lambda ctx: (ctx.out / "metrics.jsonl").unlink()),
    case("resume-metrics-cut", ONE_ROUND + ["--resume"],
         ["run metrics {out}/metrics.jsonl line 1 is not valid JSON", "a line cut short?"],
         earlier_run(ONE_ROUND), run_file("metrics.jsonl", half)),
    case("resume-metrics-row-missing", ONE_ROUND + ["--resume"],
         "--resume: {out}/metrics.jsonl lacks the predicted scores of round 1-3 on test set 1-3",
         earlier_run(ONE_ROUND), run_file("metrics.jsonl", b"")),
    case("resume-memory-truncated", ONE_ROUND + ["--resume"],
         "checkpoint file {out}/" + MEMORY + " is damaged or not a safetensors file",
         earlier_run(ONE_ROUND), unfinish, run_file(MEMORY, half)),
    case("resume-memory-foreign", ONE_ROUND + ["--resume"],
         "checkpoint file {out}/" + MEMORY + ": input_rows has shape [7, 5], this model's is [3, 64]",
         earlier_run(ONE_ROUND), unfinish, foreign_rows),
    case("resume-memory-meta-cut", ONE_ROUND + ["--resume"],
         "checkpoint file {out}/" + MEMORY_META + " is not valid JSON",
         earlier_run(ONE_ROUND), unfinish, run_file(MEMORY_META, half)),
    case("resume-memory-meta-empty", ONE_ROUND + ["--resume"],
         "checkpoint file {out}/" + MEMORY_META + ": expected an object with tool_names (a list)",
         earlier_run(ONE_ROUND), unfinish, run_file(MEMORY_META, b"{}")),
    case("resume-adapter-truncated", ONE_ROUND + ["--use_lora", "--resume"],
         "checkpoint file {out}/" + ADAPTER + " is damaged or not a safetensors file",
         earlier_run(ONE_ROUND + ["--use_lora"]), unfinish, run_file(ADAPTER, half)),
    case("new-run-over-an-unfinished-one", ONE_ROUND, "--output_dir {out} already holds a run; pass --resume",
         earlier_run(ONE_ROUND), lambda ctx: (ctx.out / "state.json").unlink()),
    case("lora-target-before-data", ["--training_rounds", "7-9:1", "--use_lora", "--lora_target_modules", "nope"],
         "--lora_target_modules: nope not found in --model_name {model}"),
]

LORA_BASE = MAIN_BASE + ["--lora_r", "2"]
LORA_CASES = SEQUENTIAL_CASES + [
    case("replay-ratio-negative", ["--use_replay_buffer", "--replay_ratio", "-0.1"],
         "argument --replay_ratio: expected a number in [0, 1], got '-0.1'"),
    case("replay-ratio-above-one", ["--use_replay_buffer", "--replay_ratio", "1.5"],
         "argument --replay_ratio: expected a number in [0, 1], got '1.5'"),
    case("replay-ratio-not-a-number", ["--replay_ratio", "half"], "argument --replay_ratio"),
    case("replay-ratio-fills-batch", ["--use_replay_buffer", "--replay_ratio", "1"], "--replay_ratio"),
    case("replay-buffer-size-zero", ["--replay_buffer_size", "0"], "argument --replay_buffer_size"),
    case("marker-style-unknown", ["--marker_style", "emoji"], "argument --marker_style"),
    case("lora-dropout-negative", ["--lora_dropout", "-0.5"], "--lora_dropout: expected a number in [0, 1)"),
    case("lora-target-unknown", ["--lora_target_modules", "no_such_proj"],
         ["--lora_target_modules: ", "no_such_proj", "the model's modules LoRA can adapt: ", "q_proj, up_proj"]),
    case("lora-targets-empty", ["--lora_target_modules", ","], "--lora_target_modules is empty"),
    case("resume-different-configuration", ONE_ROUND + ["--lora_r", "4", "--resume"],
         ["--resume", "{out}", "different configuration (--lora_r 2 then, 4 now)"], earlier_run(ONE_ROUND)),
    case("resume-checkpoint-missing", ONE_ROUND + ["--resume"], ["--resume", "{out}/checkpoints/round_1", "missing"],
         earlier_run(ONE_ROUND), remove_checkpoints),
    case("resume-adapter-truncated", ONE_ROUND + ["--resume"],
         "checkpoint file {out}/" + ADAPTER + " is damaged or not a safetensors file",
         earlier_run(ONE_ROUND), unfinish, run_file(ADAPTER, half)),
    case("resume-markers-empty", ONE_ROUND + ["--resume"],
         "checkpoint file {out}/checkpoints/round_1/markers.json: expected an object with tool_names",
         earlier_run(ONE_ROUND), unfinish, run_file("checkpoints/round_1/markers.json", b"{}")),
    case("lora-target-before-data", ["--training_rounds", "7-9:1", "--lora_target_modules", "nope"],
         "--lora_target_modules: nope not found in --model_name {model}"),
]

ICL_BASE = ["--test_data", "{data}/" + TEST_1, "--model_name", "{model}", "--output", "{out}", "--device", "cpu",
            "--max_new_tokens", "4", "--batch_size", "4"]
ICL_CASES = [
    case("test-file-missing", [], ["data file not found: {data}/" + TEST_1,
                                   "make it with: python xlam_datasets.py --top_k 1-3 --test_max_function_calls 4"],
         remove(TEST_1)),
    case("second-round-files-missing", ["--test_data", "{data}/test/function_calling_test_tools7-9_2calls.json"],
         ["data file not found: {data}/test/function_calling_test_tools7-9_2calls.json",
          "make it with: python xlam_datasets.py --top_k 7-9 --test_max_function_calls 2 --output_dir {data}"]),
    case("descriptions-missing", [], ["tool descriptions file not found: {data}/" + DESCRIPTIONS_1,
                                      "python xlam_datasets.py --top_k 1-3"], remove(DESCRIPTIONS_1)),
    case("descriptions-not-json", [], ["{data}/" + DESCRIPTIONS_1, "is not valid JSON"],
         write_text(DESCRIPTIONS_1, "{oops")),
    case("descriptions-not-object", [], ["{data}/" + DESCRIPTIONS_1, "expected a non-empty object"],
         write_text(DESCRIPTIONS_1, "[]")),
    case("data-not-json", [], ["{data}/" + TEST_1, "is not valid JSON"], write_text(TEST_1, "[{")),
    case("data-not-a-list", [], ["{data}/" + TEST_1, "expected a JSON list of samples, got str"],
         write_text(TEST_1, '"samples"')),
    case("row-without-user_input", [], ["{data}/" + TEST_1, "row 1", "missing field 'user_input'"],
         edit_rows(TEST_1, drop_field("user_input"))),
    case("row-without-tools", [], ["{data}/" + TEST_1, "row 1", "missing field 'tools'"],
         edit_rows(TEST_1, drop_field("tools"))),
    case("row-without-function_calls", [], ["{data}/" + TEST_1, "row 1", "missing field 'function_calls'"],
         edit_rows(TEST_1, drop_field("function_calls"))),
    case("tools-and-calls-differ", [], ["{data}/" + TEST_1, "row 0", "2 tools but 3 function_calls"],
         edit_rows(TEST_1, extra_call)),
    case("tool-outside-round", [], ["{data}/" + TEST_1, "row 0", "'book_table' has no description"],
         edit_rows(TEST_1, foreign_tool)),
    case("data-empty", [], ["{data}/" + TEST_1, "holds no samples"], write_text(TEST_1, "[]")),
    case("model-dir-missing", MISSING_MODEL, "--model_name '{tmp}/no_such_model': the directory does not exist"),
    case("model-gguf-missing", ["--model_name", "{tmp}/no_such.gguf"],
         "--model_name {tmp}/no_such.gguf: the GGUF file does not exist"),
    case("model-dir-empty", ["--model_name", "{tmp}/empty_model"], "--model_name '{tmp}/empty_model'",
         empty_model_dir),
    case("model-weights-unreadable", ["--model_name", "{tmp}/broken_model"],
         "cannot load --model_name '{tmp}/broken_model'", corrupt_model_weights),
    case("batch-size-zero", ["--batch_size", "0"], "argument --batch_size: expected a positive integer, got '0'"),
    case("batch-size-negative", ["--batch_size", "-1"], "argument --batch_size: expected a positive integer"),
    case("retrieval-k-zero", ["--use_rag", "--retrieval_k", "0"],
         "argument --retrieval_k: expected a positive integer, got '0'"),
    case("max-samples-zero", ["--max_samples", "0"], "argument --max_samples"),
    case("max-new-tokens-negative", ["--max_new_tokens", "-5"], "argument --max_new_tokens"),
    case("output-is-a-file", ["--output", "{tmp}/results.txt"], "--output {tmp}/results.txt exists",
         lambda ctx: (ctx.tmp / "results.txt").write_text("x")),
    case("output-holds-a-run", [], "--output {out} already holds a run", earlier_icl_run),
    case("test-file-and-descriptions-missing", [], "data file not found: {data}/" + TEST_1,
         remove(TEST_1), remove(DESCRIPTIONS_1)),
    case("test-file-of-another-name-missing", ["--test_data", "{tmp}/mine.json"], "data file not found: {tmp}/mine.json"),
    case("model-name-a-file", ["--model_name", "{tmp}/weights"], "--model_name '{tmp}/weights' is a file",
         a_file("weights")),
    case("output-dir-under-a-file", ["--output", "{tmp}/taken/run"], "--output {tmp}/taken/run: {tmp}/taken is a file",
         a_file("taken")),
    case("output-file-under-a-file", ["--output", "{tmp}/taken/results.json"],
         "--output {tmp}/taken/results.json: {tmp}/taken is a file", a_file("taken")),
    case("output-not-writable", ["--output", UNWRITABLE + "/results.json"], f"--output {UNWRITABLE}/results.json: "),
    case("default-runs-dir-a-file", ["--output", ""], "--output (default: runs/<method>_<timestamp>) runs is a file",
         a_file("runs")),
    case("prompts-beyond-positions", ["--max_new_tokens", "1000"],
         ["4 of 4 prompts (the longest", "plus --max_new_tokens 1000 exceed the model's 1024 positions"]),
    pytest.param(Case("cuda-missing", ("--device", "cuda"), ("--device cuda: CUDA is not available",)),
                 id="cuda-missing", marks=NO_CUDA),
]


def tree_state(root: Path) -> dict[str, tuple[int, int, str] | None]:
    """Every path under `root`: (size, modification time, SHA-256) of a file, None for a directory."""
    import hashlib

    state: dict[str, tuple[int, int, str] | None] = {}
    for path in root.rglob("*"):
        info = path.lstat()
        state[str(path.relative_to(root))] = None if path.is_dir() else (
            info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def check_case(ctx: Context, script: str, item: Case, round_files: bool = True) -> None:
    """Write two good rounds of data (tools 1-3 and 4-6) unless told not to, apply the case's setup, run the CLI and
    check its one error line, and that the refusal wrote nothing and kept what was there (an earlier run included)."""
    if round_files:
        write_round_files(ctx.data, 1, 3, ROUND_1)
        write_round_files(ctx.data, 4, 6, ROUND_2)
    for step in item.setup:
        step(ctx)
    before = tree_state(ctx.tmp)
    result = ctx.run(list(item.argv))
    assert_one_line_error(result, script, tuple(ctx.fill(e) for e in item.expect))
    assert tree_state(ctx.tmp) == before, "the refused run created, changed or removed files"


def forked(server: ForkServer, script: str) -> Callable[[list[str], Path], subprocess.CompletedProcess]:
    return lambda argv, cwd: server.run(script, argv, cwd)


def fresh(script: str) -> Callable[[list[str], Path], subprocess.CompletedProcess]:
    return lambda argv, cwd: run_fresh(script, argv, cwd)


@pytest.mark.parametrize("item", MAIN_CASES)
def test_main_sequential_bad_input(item, fork_server, tiny_model_dir, tmp_path):
    check_case(Context(tmp_path, tiny_model_dir, MAIN_BASE, forked(fork_server, "main_sequential.py")),
               "main_sequential.py", item)


@pytest.mark.parametrize("item", LORA_CASES)
def test_lora_sequential_bad_input(item, fork_server, tiny_model_dir, tmp_path):
    check_case(Context(tmp_path, tiny_model_dir, LORA_BASE, forked(fork_server, "lora_sequential.py")),
               "lora_sequential.py", item)


@pytest.mark.parametrize("item", ICL_CASES)
def test_icl_baseline_bad_input(item, fork_server, tiny_model_dir, tmp_path):
    check_case(Context(tmp_path, tiny_model_dir, ICL_BASE, forked(fork_server, "icl_baseline.py")),
               "icl_baseline.py", item)


def test_held_logs_are_dropped_on_an_error_and_passed_on_otherwise():
    from common import UserError, hold_logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log = logging.getLogger("tokmem.test")
    try:
        with pytest.raises(UserError):
            with hold_logs():
                log.info("checking the input")
                raise UserError("bad input")
        assert stream.getvalue() == ""
        with hold_logs():
            log.info("first")
            log.warning("second")
            assert stream.getvalue() == ""
        assert stream.getvalue().splitlines() == ["first", "second"]
        assert handler in root.handlers
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_the_fork_server_imports_quietly(fork_server):
    """Importing the CLIs prints nothing: a warning there would be a second line of every error in a fresh run."""
    assert fork_server.log.read_text() == ""


@pytest.mark.parametrize("script, base, item", [
    ("main_sequential.py", MAIN_BASE, MAIN_CASES[0].values[0]),
    ("icl_baseline.py", ICL_BASE, ICL_CASES[0].values[0]),
], ids=["main_sequential", "icl_baseline"])
def test_fresh_interpreter_gives_the_same_one_line_error(script, base, item, tiny_model_dir, tmp_path):
    check_case(Context(tmp_path, tiny_model_dir, base, fresh(script)), script, item)


# xlam_datasets.py imports no deep-learning library: a plain subprocess per case is fast enough.


def xlam_rows(ctx: Context, queries_per_tool: tuple[int, ...] = (2, 1)) -> list[dict]:
    """Valid xLAM rows with single-tool answers: tool k (tool_a, tool_b, ...) answers `queries_per_tool[k]` rows."""
    names = [f"tool_{chr(ord('a') + k)}" for k in range(len(queries_per_tool))]
    tools = json.dumps([{"name": name, "description": f"the {name} tool", "parameters": {"city": {"type": "str"}}}
                        for name in names])
    rows = []
    for name, count in zip(names, queries_per_tool):
        for i in range(count):
            rows.append({"id": len(rows), "query": f"{name} for city{i}", "tools": tools,
                         "answers": json.dumps([{"name": name, "arguments": {"city": f"city{i}"}}])})
    return rows


def xlam_file(text: Callable[[Context], str]) -> Setup:
    def apply(ctx: Context) -> None:
        (ctx.tmp / "xlam.json").write_text(text(ctx))

    return apply


def xlam_edit(edit: Callable[[list[dict]], None]) -> Setup:
    def text(ctx: Context) -> str:
        rows = xlam_rows(ctx)
        edit(rows)
        return json.dumps(rows)

    return xlam_file(text)


def undefined_answer_tool(rows: list[dict]) -> None:
    for row in rows:
        row["answers"] = json.dumps([{"name": "book_taxi", "arguments": {"city": "Rome"}}])


def renamed_tool(name: str) -> Callable[[list[dict]], None]:
    """tool_a (rank 1) renamed `name` wherever a row defines or calls it."""

    def edit(rows: list[dict]) -> None:
        for row in rows:
            for key in ("tools", "answers"):
                items = json.loads(row[key])
                for item in items:
                    item["name"] = name if item["name"] == "tool_a" else item["name"]
                row[key] = json.dumps(items)

    return edit


XLAM_FILE = ["--source", "xlam", "--xlam_path", "{tmp}/xlam.json"]
XLAM_BASE = ["--output_dir", "{data}", "--max_samples_per_tool", "5", "--train_size", "10", "--test_size", "4"]
XLAM_CASES = [
    case("top-k-malformed", ["--top_k", "1-x"], "--top_k: expected N or START-END"),
    case("top-k-reversed", ["--top_k", "50-1"], "--top_k: the range '50-1' is reversed"),
    case("top-k-empty", ["--top_k", ""], "--top_k: expected N or START-END (1-based, inclusive), got ''"),
    case("top-k-blank-part", ["--top_k", "1-5,"], "--top_k: expected N or START-END (1-based, inclusive), got ''"),
    case("top-k-zero", ["--top_k", "0-5"], "--top_k: ranks start at 1"),
    case("top-k-beyond-ranking", XLAM_FILE + ["--top_k", "1-5"], ["--top_k 1-5", "only 2 tools are ranked"],
         xlam_file(lambda ctx: json.dumps(xlam_rows(ctx)))),
    case("second-range-too-narrow", XLAM_FILE + ["--top_k", "1-3,4-4", "--train_multi_tool_ratios", "1,0",
                                                 "--test_multi_tool_ratios", "1,0", "--test_size", "2"],
         ["tools 4-4", "2-tool train samples need 2 tools", "--train_multi_tool_ratios"],
         xlam_file(lambda ctx: json.dumps(xlam_rows(ctx, (6, 6, 6, 5))))),
    case("ratios-wrong-length", ["--train_multi_tool_ratios", "0.2,0.3,0.5"], "--train_multi_tool_ratios"),
    case("ratios-not-numbers", ["--test_multi_tool_ratios", "half,half"], "--test_multi_tool_ratios"),
    case("ratios-not-summing-to-one", ["--test_multi_tool_ratios", "0.5,0.6"], "--test_multi_tool_ratios"),
    case("train-size-zero", ["--train_size", "0"], "argument --train_size: expected a positive integer"),
    case("test-size-negative", ["--test_size", "-3"], "argument --test_size: expected a positive integer"),
    case("samples-per-tool-zero", ["--max_samples_per_tool", "0"], "argument --max_samples_per_tool"),
    case("call-cap-zero", ["--train_max_function_calls", "0"], "argument --train_max_function_calls"),
    case("test-cap-too-small", ["--test_max_function_calls", "2"], "--test_max_function_calls 2 cannot hold"),
    case("source-unknown", ["--source", "hub"], "argument --source: invalid choice: 'hub'"),
    case("xlam-path-without-xlam-source", ["--xlam_path", "{tmp}/xlam.json"], "--xlam_path is only read with"),
    case("xlam-file-missing", XLAM_FILE, ["xLAM file {tmp}/xlam.json not found", "--xlam_path"]),
    case("xlam-file-not-json", XLAM_FILE, ["xLAM file {tmp}/xlam.json is not valid JSON"],
         xlam_file(lambda ctx: "[{oops")),
    case("xlam-file-not-a-list", XLAM_FILE, ["xLAM file {tmp}/xlam.json: line 1 is not valid JSON"],
         xlam_file(lambda ctx: json.dumps({"rows": xlam_rows(ctx)}, indent=2))),
    case("xlam-row-not-object", XLAM_FILE, ["xLAM file {tmp}/xlam.json: row 0", "expected an object"],
         xlam_file(lambda ctx: "[1, 2]")),
    case("xlam-row-without-query", XLAM_FILE, ["{tmp}/xlam.json: row 1", "missing field 'query'"],
         xlam_edit(lambda rows: rows[1].pop("query"))),
    case("xlam-row-without-tools", XLAM_FILE, ["{tmp}/xlam.json: row 2", "missing field 'tools'"],
         xlam_edit(lambda rows: rows[2].pop("tools"))),
    case("xlam-row-without-answers", XLAM_FILE, ["{tmp}/xlam.json: row 0", "missing field 'answers'"],
         xlam_edit(lambda rows: rows[0].pop("answers"))),
    case("xlam-answers-not-a-list", XLAM_FILE, ["{tmp}/xlam.json: row 0", "field 'answers' must encode a JSON list"],
         xlam_edit(lambda rows: rows[0].update(answers='{"name": "get_weather"}'))),
    case("xlam-answer-tool-undefined", XLAM_FILE + ["--top_k", "1-1"], ["book_taxi", "'tools' field"],
         xlam_edit(undefined_answer_tool)),
    case("xlam-file-empty-list", XLAM_FILE, "xLAM file {tmp}/xlam.json holds no rows", xlam_file(lambda ctx: "[]")),
    case("xlam-file-zero-bytes", XLAM_FILE, "xLAM file {tmp}/xlam.json holds no rows", xlam_file(lambda ctx: "")),
    case("xlam-tool-named-like-a-special-token", XLAM_FILE + ["--top_k", "1-1"],
         "--top_k 1-1: the tool of rank 1, '<|eot_id|>', is written like a tokenizer's special token",
         xlam_edit(renamed_tool("<|eot_id|>"))),
    case("xlam-tool-name-with-control-character", XLAM_FILE + ["--top_k", "1-1"],
         "--top_k 1-1: the tool of rank 1, 'tool\\x07a', holds control or format characters",
         xlam_edit(renamed_tool("tool\x07a"))),
]


@pytest.mark.parametrize("item", XLAM_CASES)
def test_xlam_datasets_bad_input(item, tmp_path):
    check_case(Context(tmp_path, tmp_path, XLAM_BASE, fresh("xlam_datasets.py")), "xlam_datasets.py", item,
               round_files=False)
    assert not (tmp_path / "data").exists(), "a refused run wrote data files"


# ---------------------------------------------------------------------------------------------------------------------
# Resume and replay of the LoRA baseline, in this process (TokMem's SIGKILL test is in test_resume.py)

LORA_BATCH, LORA_REPLAY_RATIO, LORA_EPOCHS = 4, 0.5, (1, 2)


def lora_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:1,4-6:2", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", str(LORA_BATCH), "--eval_all_previous", "--max_new_tokens", "8",
            "--device", "cpu", "--seed", "7", "--lora_r", "4", "--use_replay_buffer", "--replay_buffer_size", "8",
            "--replay_ratio", str(LORA_REPLAY_RATIO)]


@pytest.fixture(scope="module")
def lora_reference(tiny_model_dir, two_round_data, tmp_path_factory) -> tuple[dict, TrainingRecorder]:
    """summary.json and the recorded rounds of one uninterrupted LoRA + replay run."""
    out = tmp_path_factory.mktemp("lora_reference") / "whole"
    recorder = TrainingRecorder()
    return run_in_process(lora_sequential.main, lora_args(tiny_model_dir, two_round_data, out), recorder), recorder


def queries_of(data: Path, spec: str) -> set[str]:
    return {s["user_input"] for s in json.loads((data / "training" / f"function_calling_train_tools{spec}_4calls.json")
                                                 .read_text())}


@pytest.mark.slow
def test_lora_replay_resume_after_round_one_trains_only_round_two(lora_reference, tiny_model_dir, two_round_data,
                                                                  tmp_path):
    summary, reference = lora_reference
    args = lora_args(tiny_model_dir, two_round_data, tmp_path / "stopped")
    stopped = TrainingRecorder(stop_at="round 4-6")
    assert run_in_process(lora_sequential.main, args, stopped) is None
    assert json.loads((tmp_path / "stopped" / "state.json").read_text())["completed_rounds"] == 1
    recorder = TrainingRecorder()
    resumed = run_in_process(lora_sequential.main, args + ["--resume"], recorder)
    assert recorder.descriptions == ["round 4-6"], "a resumed run trains only the rounds it lacks"
    (record,) = recorder.records
    first = reference.records[0]
    assert first.lora_before.keys() == record.lora_before.keys()
    assert all(torch.equal(record.lora_before[k], first.lora_after[k]) for k in first.lora_after), \
        "round 2 starts from round 1's adapter"
    assert any(not torch.equal(first.lora_before[k], first.lora_after[k]) for k in first.lora_after)
    assert record.batches == reference.records[1].batches, "the rebuilt buffer replays the same samples"
    assert numbers(resumed) == numbers(summary)
    assert resumed["method"] == "lora_replay"


def test_every_replay_batch_holds_the_asked_share_of_earlier_rounds(lora_reference, two_round_data):
    _, reference = lora_reference
    old, new = queries_of(two_round_data, "1-3"), queries_of(two_round_data, "4-6")
    first, second = reference.records
    assert all(set(batch) <= old for batch in first.batches), "round 1 has nothing to replay"
    replayed = LORA_BATCH * LORA_REPLAY_RATIO
    for batch in second.batches:
        assert sum(q in old for q in batch) == replayed and sum(q in new for q in batch) == len(batch) - replayed
    own = Counter(q for batch in second.batches for q in batch if q in new)
    assert own == {q: LORA_EPOCHS[1] for q in new}, "every sample of the round once per epoch"
    assert second.steps == -(-len(new) // int(LORA_BATCH - replayed)) * LORA_EPOCHS[1]


# ---------------------------------------------------------------------------------------------------------------------
# Loading: safetensors and JSON only, never a pickle

SKIPPED_DIRS = {".git", "__pycache__", ".venv", "venv", "env", "site-packages", "node_modules", "runs", "models",
                "data", "build", "dist"}
PICKLE_LOADERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
                  "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
                  "joblib.load", "pandas.read_pickle", "torch.serialization.load", "shelve.open"}


def repo_modules() -> list[Path]:
    """Every .py file of the repository, outside hidden, virtual-environment and output directories."""
    found = []
    for path in REPO_ROOT.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).parts[:-1]
        if not any(part in SKIPPED_DIRS or part.startswith(".") for part in parts):
            found.append(path)
    return sorted(found)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Calls that may unpickle: torch.load without weights_only=True, np.load(allow_pickle=True), pickle-family loads.

    Names are resolved through the module's imports (`import torch as th`, `from pickle import loads`).
    """
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def dotted(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}"
        if name == "torch.load" and not _is_true(keywords.get("weights_only")):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif name == "numpy.load" and "allow_pickle" in keywords and not _is_false(keywords["allow_pickle"]):
            problems.append(f"{where}: numpy.load with allow_pickle")
        elif name in PICKLE_LOADERS:
            problems.append(f"{where}: {name}")
    return problems


def test_the_unsafe_load_check_finds_what_it_should():
    source = (
        "import torch\nimport torch as th\nimport numpy as np\nimport pickle\nfrom pickle import loads as lds\n"
        "from torch import load\nimport joblib\n"
        "torch.load('a')\nth.load('a', weights_only=False)\nload('a')\nnp.load('a', allow_pickle=True)\n"
        "pickle.load(f)\nlds(b)\njoblib.load('a')\n"
        "torch.load('ok', weights_only=True)\nnp.load('ok.npy')\nnp.load('ok', allow_pickle=False)\n"
        "pickle.dumps(1)\njson.load(f)\n"
    )
    problems = unsafe_loads(source)
    assert [int(p.split(":")[1]) for p in problems] == [8, 9, 10, 11, 12, 13, 14]


def test_no_module_of_the_repository_loads_a_pickle():
    modules = repo_modules()
    assert REPO_ROOT / "model.py" in modules and Path(__file__) in modules
    problems = [p for path in modules for p in unsafe_loads(path.read_text(encoding="utf-8"), str(path))]
    assert not problems, "\n".join(problems)


def test_a_finished_run_directory_holds_only_safetensors_json_and_text(fork_server, tiny_model_dir, tmp_path):
    """One tiny TokMem + LoRA round with every checkpoint kept: no pickle-capable file, every file whole."""
    write_round_files(tmp_path / "data", 1, 3, ROUND_1, n_train=6, n_test=2)
    out = tmp_path / "run"
    result = fork_server.run("main_sequential.py", [
        "--model_name", str(tiny_model_dir), "--training_rounds", "1-3:1", "--data_dir", str(tmp_path / "data"),
        "--output_dir", str(out), "--device", "cpu", "--batch_size", "4", "--max_new_tokens", "4", "--use_lora",
        "--save_checkpoints"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_no_pickle_files(out)
    assert_files_complete(out)
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".jsonl", ".safetensors", ".png", ".log"}, suffixes
    assert (out / "checkpoints" / "round_1" / "tool_memory.safetensors").is_file()
    assert (out / "checkpoints" / "round_1" / "lora" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on a backbone without reserved tokens and with tied embeddings (small Qwen / GPT-2 style)

TIED_CLIS = [("main_sequential.py", ["--use_lora"]), ("lora_sequential.py", ["--lora_r", "2"])]


def tied_args(model_dir: Path, data: Path, out: Path, extra: list[str]) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:1,4-6:2", "--data_dir", str(data),
            "--output_dir", str(out), "--device", "cpu", "--batch_size", "4", "--max_new_tokens", "6", "--seed", "3",
            "--eval_all_previous", "--save_checkpoints", *extra]


def rewind_to_first_round(finished: Path, target: Path) -> None:
    """A copy of a finished two-round run as it stood once round 1 was done: round 2's record and files removed."""
    shutil.copytree(finished, target)
    state = json.loads((target / "state.json").read_text())
    state.update(completed_rounds=1, round_stats=state["round_stats"][:1])
    (target / "state.json").write_text(json.dumps(state))
    lines = (target / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["round"] == 0))
    (target / "summary.json").unlink()
    shutil.rmtree(target / "checkpoints" / "round_2")


def adapter_keys(checkpoint: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "lora" / "adapter_model.safetensors"), framework="pt") as tensors:
        return list(tensors.keys())


@pytest.mark.parametrize("script, extra", TIED_CLIS, ids=["tokmem", "lora_baseline"])
def test_lora_on_a_tied_backbone_without_reserved_tokens_saves_resumes_and_evaluates(
        script, extra, fork_server, tied_model_dir, two_round_data, tmp_path):
    from transformers import AutoTokenizer

    whole = tmp_path / "whole"
    result = fork_server.run(script, tied_args(tied_model_dir, two_round_data, whole, extra), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_files_complete(whole)
    assert_no_pickle_files(whole)
    for checkpoint in ("round_1", "round_2"):
        keys = adapter_keys(whole / "checkpoints" / checkpoint)
        # q, k, v and o projections of 2 layers, an A and a B matrix each: the adapter and nothing else.
        assert len(keys) == 4 * 2 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    if script == "main_sequential.py":
        vocabulary = len(AutoTokenizer.from_pretrained(tied_model_dir))
        token_ids = json.loads((whole / "checkpoints" / "round_2" / "tool_memory.json").read_text())["tool_token_ids"]
        assert min(token_ids) >= vocabulary, "the tools should have new tokens on a tokenizer without reserved ones"

    resumed = tmp_path / "resumed"
    rewind_to_first_round(whole, resumed)
    result = fork_server.run(script, tied_args(tied_model_dir, two_round_data, resumed, extra) + ["--resume"],
                             tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {resumed} after 1 finished round(s)" in (resumed / "train.log").read_text()
    reference = json.loads((whole / "summary.json").read_text())
    again = json.loads((resumed / "summary.json").read_text())
    assert numbers(again) == numbers(reference)
    assert all(value is not None for value in again["matrix"]["avg_tool_f1_score"][-1])


def test_an_untied_resized_backbone_saves_no_embedding_layers(tmp_path):
    from conftest import build_qwen_style_backbone
    from model import FunctionCallingModel, LoraSettings

    model_dir = build_qwen_style_backbone(tmp_path / "untied", tied=False)
    model = FunctionCallingModel(str(model_dir), 3, ROUND_1, device="cpu", lora_config=LoraSettings(r=2))
    assert model.causal_lm.get_output_embeddings().weight is not model.causal_lm.get_input_embeddings().weight
    model.save(tmp_path / "checkpoint")
    keys = adapter_keys(tmp_path / "checkpoint")
    assert len(keys) == 16 and not [k for k in keys if "embed_tokens" in k or "lm_head" in k], keys


# ---------------------------------------------------------------------------------------------------------------------
# Run directories: claimed exclusively; --resume of the same configuration written differently


def test_default_run_directories_are_claimed_exclusively(tmp_path, monkeypatch):
    """Runs started in the same second never share a directory, nor take an earlier run's."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    import experiment

    class SameSecond(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 1, 12, 0, 0)

    monkeypatch.setattr(experiment, "datetime", SameSecond)
    root = tmp_path / "runs"
    earlier = root / "tokmem_20240501_120000"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: experiment.claim_default_run_dir("tokmem", root), range(8)))
    assert sorted(p.name for p in claimed) == sorted(f"tokmem_20240501_120000_{n}" for n in range(2, 10))
    assert all(p.is_dir() and not any(p.iterdir()) for p in claimed)
    assert (earlier / "config.json").read_text() == "{}"


def test_resume_accepts_the_same_configuration_written_differently_and_leaves_a_finished_run_alone(
        fork_server, tiny_model_dir, tmp_path):
    import torch

    data, out = tmp_path / "data", tmp_path / "run"
    write_round_files(data, 1, 3, ROUND_1, n_train=6, n_test=2)
    write_round_files(data, 4, 6, ROUND_2, n_train=6, n_test=2)
    common = ["--output_dir", str(out), "--batch_size", "4", "--max_new_tokens", "4", "--use_lora"]
    first = fork_server.run("main_sequential.py", common + [
        "--model_name", str(tiny_model_dir), "--data_dir", str(data), "--training_rounds", "1-3:1,4-6:2",
        "--lora_target_modules", "q_proj,v_proj", "--device", "cpu"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())["args"]
    assert (config["device"], config["dtype"]) == ("cpu", "float32"), "the config records what auto resolved to"
    finished = tree_state(out)

    resumed = fork_server.run("main_sequential.py", common + [
        "--model_name", f"{tiny_model_dir}/", "--data_dir", f"{data}/", "--training_rounds", " 1-3 : 1, 4-6:2",
        "--lora_target_modules", "q_proj, v_proj", "--device", "cpu" if torch.cuda.is_available() else "auto",
        "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{out} already finished its 2 round(s); nothing to train" in resumed.stderr
    assert tree_state(out) == finished, "a finished run changed on --resume"


@pytest.mark.parametrize("output, expect", [
    ("{tmp}/taken/cmp.png", "--output {tmp}/taken/cmp.png: {tmp}/taken is a file"),
    ("{tmp}/folder.png", "--output {tmp}/folder.png is a directory, not a file"),
    (UNWRITABLE + "/cmp.png", f"--output {UNWRITABLE}/cmp.png: cannot write in /sys"),
], ids=["under-a-file", "a-directory", "not-writable"])
def test_compare_runs_refuses_an_output_it_cannot_write_before_reading_runs(output, expect, tmp_path):
    import compare_runs
    from common import UserError

    (tmp_path / "taken").write_text("x")
    (tmp_path / "folder.png").mkdir()
    before = tree_state(tmp_path)
    with pytest.raises(UserError) as error:
        compare_runs.main([str(tmp_path / "no_such_run"), "--output", output.format(tmp=tmp_path)])
    assert str(error.value).startswith(expect.format(tmp=tmp_path)), str(error.value)
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------------
# Over-long samples keep their answer


def _tool_encoder(tokenizer):
    token = tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    return lambda tool: [token]


def _long_sample(words: int) -> dict:
    from conftest import make_sample

    return make_sample(["get_weather"], [{"city": "Paris", "date": "2024-05-01"}],
                       " ".join(f"w{i}" for i in range(words)) + " weather in Paris on 2024-05-01")


def test_an_over_long_query_loses_its_head_not_the_answer_nor_the_template(tiny_tokenizer):
    from dataset import IGNORE_INDEX, build_answer_ids, build_prompt_ids, encode_sample

    encode = _tool_encoder(tiny_tokenizer)
    sample = _long_sample(200)
    answer = build_answer_ids(tiny_tokenizer, sample["tools"], sample["function_calls"], encode)
    full = build_prompt_ids(tiny_tokenizer, sample["user_input"])
    max_length = len(answer) + len(full) // 2
    item = encode_sample(sample, tiny_tokenizer, encode, max_length, "train")
    assert item["truncated"] and len(item["input_ids"]) <= max_length
    prompt = item["input_ids"][:-len(answer)]
    assert item["input_ids"][-len(answer):] == answer
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    # The prompt is the template around the longest tail of the query (whole words) that fits.
    words = sample["user_input"].split(" ")
    tails = [build_prompt_ids(tiny_tokenizer, " ".join(words[k:])) for k in range(1, len(words))]
    assert prompt == next(ids for ids in tails if len(ids) <= max_length - len(answer))
    assert prompt[:4] == full[:4] and prompt[-4:] == full[-4:]

    evaluated = encode_sample(sample, tiny_tokenizer, encode, len(full) // 2, "eval")
    assert evaluated["truncated"] and evaluated["input_ids"] == next(ids for ids in tails if len(ids) <= len(full) // 2)


def test_samples_whose_answer_fills_max_length_are_left_out_and_counted(tiny_tokenizer, caplog):
    from common import UserError
    from dataset import NativeFunctionCallingDataset, build_answer_ids, build_prompt_ids

    encode = _tool_encoder(tiny_tokenizer)
    short, long_query = _long_sample(0), _long_sample(60)
    no_room = dict(short, function_calls=[json.dumps({"notes": "w " * 200})])
    answer = build_answer_ids(tiny_tokenizer, short["tools"], short["function_calls"], encode)
    max_length = len(build_prompt_ids(tiny_tokenizer, short["user_input"])) + len(answer)
    with caplog.at_level(logging.WARNING):
        dataset = NativeFunctionCallingDataset([short, long_query, no_room], tiny_tokenizer, encode, max_length)
    assert [item["user_input"] for item in dataset.items] == [short["user_input"], long_query["user_input"]]
    assert all(item["input_ids"][-len(answer):] == answer for item in dataset.items)
    assert "1 of 3 samples are longer than --max_length" in caplog.text
    assert "1 of 3 training samples left out: their answer alone fills --max_length" in caplog.text
    with pytest.raises(UserError, match="every one of the 2 training samples has an answer longer than --max_length"):
        NativeFunctionCallingDataset([no_room, no_room], tiny_tokenizer, encode, max_length)


# ---------------------------------------------------------------------------------------------------------------------
# --help: every flag explained, with its default in sight, and the scripts' other defaults named

HELP_PARSERS = [("main_sequential", "build_parser"), ("lora_sequential", "build_parser"),
                ("icl_baseline", "build_parser"), ("xlam_datasets", "_parser"), ("compare_runs", "build_parser"),
                ("eval", "build_parser")]


def help_entry(parser, flag: str) -> str:
    """The --help text of one flag, whitespace collapsed."""
    action = parser._option_string_actions[flag]
    return " ".join(parser._get_formatter()._format_action(action).split())


@pytest.mark.parametrize("module, factory", HELP_PARSERS, ids=[m for m, _ in HELP_PARSERS])
def test_every_flag_has_help_text_and_a_visible_default(module, factory):
    import importlib

    parser = getattr(importlib.import_module(module), factory)()
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert flags
    for action in flags:
        flag = action.option_strings[0]
        entry = help_entry(parser, flag)
        assert action.help and "default" in entry, f"{module} {flag}: {entry}"
        if action.default not in (None, False) and action.nargs != 0:
            shown = "".join(entry.split())  # argparse may wrap a long default at a hyphen
            assert str(action.default) in shown, f"{module} {flag} does not show {action.default!r}: {entry}"


def script_default(script: str, variable: str) -> str:
    """The default a shell script gives a variable: `NAME=${NAME:-value}`."""
    import re

    match = re.search(rf"^{variable}=\$\{{{variable}:-([^}}]*)\}}", (REPO_ROOT / script).read_text(), re.M)
    assert match, f"{script} sets no default for {variable}"
    return match.group(1)


@pytest.mark.parametrize("module, factory, flag, script, variable", [
    ("main_sequential", "build_parser", "--lr", "run_n_rounds_main.sh", "LR"),
    ("main_sequential", "build_parser", "--train_max_function_calls", "data_rounds.sh", "TRAIN_MAX_CALLS"),
    ("lora_sequential", "build_parser", "--test_max_function_calls", "data_rounds.sh", "TEST_MAX_CALLS"),
    ("xlam_datasets", "_parser", "--max_samples_per_tool", "data_rounds.sh", "SAMPLES_PER_TOOL"),
    ("xlam_datasets", "_parser", "--train_size", "data_rounds.sh", "TRAIN_SIZE"),
    ("xlam_datasets", "_parser", "--test_size", "data_rounds.sh", "TEST_SIZE"),
], ids=lambda value: value if isinstance(value, str) and value.startswith("--") else None)
def test_help_names_the_scripts_default_where_it_differs(module, factory, flag, script, variable):
    import importlib

    parser = getattr(importlib.import_module(module), factory)()
    value = script_default(script, variable)
    assert float(value) != float(parser._option_string_actions[flag].default)
    assert value in help_entry(parser, flag)


# ---------------------------------------------------------------------------------------------------------------------
# One process writes a run directory


def test_two_runs_started_a_second_apart_into_one_directory_one_runs_one_is_refused(fork_server, tiny_model_dir,
                                                                                   tmp_path):
    write_round_files(tmp_path / "data", 1, 3, ROUND_1, n_train=6, n_test=2)
    out = tmp_path / "run"
    argv = ["--model_name", str(tiny_model_dir), "--training_rounds", "1-3:1", "--data_dir", str(tmp_path / "data"),
            "--output_dir", str(out), "--device", "cpu", "--batch_size", "4", "--max_new_tokens", "4"]
    first = subprocess.Popen([sys.executable, str(REPO_ROOT / "main_sequential.py"), *argv, "--seed", "42"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + CASE_TIMEOUT
        while not (out / "run.lock").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        holder = (out / "run.lock").read_text()
        assert holder.startswith(f"pid {first.pid} on host "), holder
        second = fork_server.run("main_sequential.py", argv + ["--seed", "7"], tmp_path)
        assert first.poll() is None, "the second run was refused only after the first ended"
        assert_one_line_error(second, "main_sequential.py", (
            f"--output_dir {out} is in use by another run (pid {first.pid} on host ", f"{out}/run.lock",
            "wait for it to end or use another --output_dir"))
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["args"]["seed"] == 42
    assert not (out / "run.lock").exists(), "the lock is given back when the run ends"
    assert (out / "train.log").read_text().count("run directory") == 1, "one run's lines in train.log"


def test_a_lock_left_by_a_dead_process_is_taken_over_saying_so(fork_server, tiny_model_dir, tmp_path):
    write_round_files(tmp_path / "data", 1, 3, ROUND_1, n_train=6, n_test=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text("pid 999999 on host gone\n")
    result = fork_server.run("main_sequential.py", [
        "--model_name", str(tiny_model_dir), "--training_rounds", "1-3:1", "--data_dir", str(tmp_path / "data"),
        "--output_dir", str(out), "--device", "cpu", "--batch_size", "4", "--max_new_tokens", "4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{out}/run.lock: taking over the lock of pid 999999 on host gone, which no longer runs" in result.stderr
    assert not (out / "run.lock").exists() and (out / "summary.json").is_file()


def test_preflight_checks_without_data_and_writes_nothing(fork_server, tiny_model_dir, tmp_path):
    before = tree_state(tmp_path)
    result = fork_server.run("main_sequential.py", [
        "--model_name", str(tiny_model_dir), "--training_rounds", "1-3:1,4-6:1", "--data_dir", str(tmp_path / "none"),
        "--output_dir", str(tmp_path / "run"), "--device", "cpu", "--use_lora", "--preflight"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preflight: the flags, output place and backbone pass" in result.stderr
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("script", ["run_n_rounds_main.sh", "run_n_rounds_lora.sh"])
def test_scripts_refuse_a_variable_given_as_an_argument_before_any_step(script, tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / script), "OUTPUT_DIR=x"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": "false"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: argument 'OUTPUT_DIR=x' looks like a variable; variables go before the command, in the environment: "
        f"OUTPUT_DIR=... bash {script} (arguments after the script go to the Python CLI as flags)"]
    assert not any(tmp_path.iterdir()) and not (REPO_ROOT / "x").exists()
