"""Several processes (distributed.py): shares and their order, and two CPU processes under torchrun (gloo) giving
one process's numbers for TokMem, the LoRA baseline, the in-context baseline and --shard_backbone (FSDP2), a hung
or killed process ending the job, and --resume after it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import distributed
import icl_baseline
import lora_sequential
import main_sequential
from common import UserError
from conftest import REPO_ROOT, assert_files_complete, kept_logging, write_round_files

ROUND_ONE = ["get_weather", "convert_currency", "search_flights"]
ROUND_TWO = ["calculate_bmi", "book_table", "translate_text"]
# 13 training samples in batches of 4: the last global batch holds one sample, so process 1's share of it is empty.
# 7 test samples in eval batches of 2: four batches, the last of one sample (an odd test set, shared unevenly).
TRAIN_FIRST, TEST_FIRST = 13, 7


@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("dist_data")
    write_round_files(data, 1, 3, ROUND_ONE, n_train=TRAIN_FIRST, n_test=TEST_FIRST)
    write_round_files(data, 4, 6, ROUND_TWO, n_train=11, n_test=5)
    return data


def torchrun(script: str, args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`script` under `python -m torch.distributed.run --standalone --nproc_per_node 2` (one thread each)."""
    return subprocess.run(launch(script, args), cwd=cwd, env=launch_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def launch(script: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO_ROOT / script), *args]


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def our_lines(stderr: str, prog: str) -> list[str]:
    """The error lines the processes wrote (an open progress bar may precede one on its line)."""
    return [line[line.index(f"{prog}: error:"):] for line in stderr.splitlines() if f"{prog}: error:" in line]


def in_one_process(main, argv: list[str]) -> None:
    with kept_logging():
        assert main(argv) == 0


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_close_state(one: Path, two: Path, file: str, tolerance: float = 1e-6) -> None:
    a, b = tensors(one / file), tensors(two / file)
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert a[key].shape == b[key].shape
        assert (a[key] - b[key]).abs().max().item() <= tolerance, (file, key)


# ----------------------------------------------------------------------------------------------------------------------
# One process, and the shares computed for a pretended rank


def test_one_process_helpers_are_the_identity():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
    assert distributed.work_share(3) == [0, 1, 2]
    assert distributed.gather_in_order(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        distributed.gather_in_order(["a"], 2)
    grad = torch.ones(3)
    distributed.all_reduce_([grad])
    assert grad.tolist() == [1.0, 1.0, 1.0]
    assert distributed.sum_values([2, 0.5]) == [2.0, 0.5]
    assert distributed.all_finished(False) is False and distributed.any_true(True) is True
    assert distributed.from_main(lambda: "made") == "made"
    assert distributed.init_from_env(torch.device("cpu")) == torch.device("cpu")  # WORLD_SIZE unset: no group
    loader = DataLoader(list(range(5)), batch_size=2)
    assert distributed.share_batches(loader) is loader


@pytest.mark.parametrize("world", [2, 3, 4])
def test_interleave_restores_item_order_whatever_the_share_sizes(world):
    for total in range(0, 11):
        items = [f"sample{i}" for i in range(total)]
        parts = [items[rank::world] for rank in range(world)]  # round robin, as shard() cuts them
        assert sum(map(len, parts)) == total
        assert distributed.interleave(parts, total) == items
    parts = [["a", "c"], ["b"]]
    with pytest.raises(RuntimeError, match="process 1 sent 1 results, expected 2"):
        distributed.interleave(parts, 4)  # an item dropped
    with pytest.raises(RuntimeError, match="process 0 sent 2 results, expected 1"):
        distributed.interleave([["a", "a"], ["b"]], 2)  # an item twice


def pretend(monkeypatch, rank: int, world: int, lockstep: bool = False) -> None:
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "lockstep", lambda: lockstep)


def test_work_share_round_robin_and_padded_in_lockstep(monkeypatch):
    shares = {}
    for rank in range(3):
        pretend(monkeypatch, rank, 3)
        shares[rank] = distributed.work_share(7)
    assert shares == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}
    pretend(monkeypatch, 2, 3, lockstep=True)
    assert distributed.work_share(7) == [2, 5, None]  # as many forward calls as process 0
    assert distributed.work_share(1) == [None]


def test_share_batches_cuts_the_global_batches_one_process_draws(monkeypatch):
    def loader():
        return DataLoader(list(range(9)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5),
                          collate_fn=lambda items: {"ids": list(items)})

    global_batches = [batch["ids"] for batch in loader()]
    assert len(global_batches) == 3 and len(global_batches[-1]) == 1
    shares = []
    for rank in range(2):
        pretend(monkeypatch, rank, 2)
        shares.append([batch for batch in distributed.share_batches(loader())])
    for index, whole in enumerate(global_batches):
        first, second = shares[0][index], shares[1][index]
        assert first["ids"] == whole[0::2] and first["dummy"] is False
        if len(whole) > 1:
            assert second["ids"] == whole[1::2] and second["dummy"] is False
        else:  # an empty share: the batch's first sample, marked as a dummy of weight zero
            assert second["ids"] == whole[:1] and second["dummy"] is True


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_seconds() == 2.5
    for bad in ("0", "soon", "inf"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match="TOKMEM_DIST_TIMEOUT"):
            distributed.timeout_seconds()


# ----------------------------------------------------------------------------------------------------------------------
# Two processes (gloo)


@pytest.mark.slow
def test_collectives_between_two_processes(tmp_path):
    result = torchrun("tests/dist_worker.py", ["collectives", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["world"] == 2
        assert got["gathered"] == {str(n): [f"item{i}" for i in range(n)] for n in range(8)}
        assert got["floats"] == [[3.0] * 3] * 2 and got["doubles"] == [0.0, 3.0, 6.0, 9.0]  # 1 + 2, and x * (1 + 2)
        assert got["any"] is True and got["none"] is False and got["sums"] == [1.0, 1.0]
        assert got["from_main"] == "made by 0" and got["refused"] == "refused on process 0"
        assert got["work_share"] == [[0, 2, 4], [1, 3]][rank]


@pytest.mark.slow
def test_a_nan_on_one_process_stops_every_process_at_the_same_batch(tmp_path):
    result = torchrun("tests/dist_worker.py", ["nan", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads((tmp_path / f"rank{rank}.json").read_text())["error"] for rank in range(2)]
    assert errors[0] == errors[1] and "the loss became nan at epoch 1, batch 2" in errors[0]


@pytest.mark.slow
def test_a_hung_process_ends_the_job_within_the_timeout(tmp_path):
    started = time.monotonic()
    result = torchrun("tests/dist_worker.py", ["hang", str(tmp_path)], tmp_path, timeout=90,
                      TOKMEM_DIST_TIMEOUT="3")
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    lines = our_lines(result.stderr, "dist_worker.py")
    assert any(re.search(r"process 0 of 2: all_reduce failed.*within 3 s", line) for line in lines), result.stderr
    assert len(lines) <= 2  # one line per process at most


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_predictions_in_dataset_order_as_one_process(tiny_model_dir, rounds, tmp_path, shard):
    from dist_worker import predict

    test_file = rounds / "test" / "function_calling_test_tools1-3_4calls.json"
    args = ["predict", str(tmp_path), str(tiny_model_dir), str(test_file)] + (["shard"] if shard else [])
    result = torchrun("tests/dist_worker.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "predictions.json").read_text())
    (tmp_path / "one").mkdir()
    predict(tmp_path / "one", str(tiny_model_dir), str(test_file), False)
    one = json.loads((tmp_path / "one" / "predictions.json").read_text())
    queries = [sample["user_input"] for sample in json.loads(test_file.read_text())]
    assert len(queries) == TEST_FIRST and [p["user_input"] for p in two] == queries  # 3 batches of 3, 3, 1
    assert two == one


def tokmem_args(rounds: Path, tiny_model_dir: Path, out: Path, epochs: str = "1-3:2,4-6:1") -> list[str]:
    return ["--model_name", str(tiny_model_dir), "--training_rounds", epochs, "--data_dir", str(rounds),
            "--output_dir", str(out), "--batch_size", "4", "--eval_batch_size", "2", "--eval_all_previous",
            "--max_new_tokens", "12", "--device", "cpu", "--lr", "0.05", "--save_checkpoints"]


@pytest.mark.slow
def test_tokmem_two_processes_and_a_sharded_backbone_give_one_process_numbers(tiny_model_dir, rounds, tmp_path):
    extra = ["--use_lora", "--lora_dropout", "0", "--use_ground_truth_tools", "--gradient_accumulation_steps", "2",
             "--prototype_weight", "1"]
    in_one_process(main_sequential.main, tokmem_args(rounds, tiny_model_dir, tmp_path / "one") + extra)
    for name, flags in (("two", []), ("sharded", ["--shard_backbone"])):
        result = torchrun("main_sequential.py", tokmem_args(rounds, tiny_model_dir, tmp_path / name) + extra + flags,
                          tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "after the last round" in result.stdout and result.stdout.count("run directory:") == 1
        one, two = tmp_path / "one", tmp_path / name
        assert_files_complete(two)
        for round_dir in ("round_1", "round_2"):
            assert_close_state(one / "checkpoints" / round_dir, two / "checkpoints" / round_dir,
                               "tool_memory.safetensors")
            assert_close_state(one / "checkpoints" / round_dir, two / "checkpoints" / round_dir,
                               "lora/adapter_model.safetensors")
        summary_one = json.loads((one / "summary.json").read_text())
        summary_two = json.loads((two / "summary.json").read_text())
        assert summary_two["matrix"] == summary_one["matrix"]
        assert summary_two["ground_truth_tools_matrix"] == summary_one["ground_truth_tools_matrix"]
        for a, b in zip(summary_one["round_stats"], summary_two["round_stats"]):
            assert a["steps"] == b["steps"] and a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-6)
        config = json.loads((two / "config.json").read_text())
        assert config["world_size"] == 2 and config["args"]["shard_backbone"] == (name == "sharded")
        log = (two / "train.log").read_text()
        assert "round 1-3: 4 steps" in log  # 4 global batches per epoch, accumulated in pairs, 2 epochs
        assert "[process 1]" not in log


@pytest.mark.slow
def test_lora_baseline_two_processes_give_one_process_numbers(tiny_model_dir, rounds, tmp_path):
    def args(out: Path) -> list[str]:
        return ["--model_name", str(tiny_model_dir), "--training_rounds", "1-3:2,4-6:1", "--data_dir", str(rounds),
                "--output_dir", str(out), "--batch_size", "4", "--eval_batch_size", "2", "--eval_all_previous",
                "--max_new_tokens", "12", "--device", "cpu", "--lora_dropout", "0", "--use_replay_buffer",
                "--replay_ratio", "0.25", "--save_checkpoints"]

    in_one_process(lora_sequential.main, args(tmp_path / "one"))
    result = torchrun("lora_sequential.py", args(tmp_path / "two"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for round_dir in ("round_1", "round_2"):
        assert_close_state(tmp_path / "one" / "checkpoints" / round_dir, tmp_path / "two" / "checkpoints" / round_dir,
                           "lora/adapter_model.safetensors")
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["matrix"] == one["matrix"]


@pytest.mark.slow
def test_icl_baseline_two_processes_give_one_process_predictions(tiny_model_dir, rounds, tmp_path):
    def args(out: Path) -> list[str]:
        return ["--test_data", str(rounds / "test" / "function_calling_test_tools1-3_4calls.json"), "--model_name",
                str(tiny_model_dir), "--device", "cpu", "--max_new_tokens", "12", "--batch_size", "2",
                "--output", str(out)]

    in_one_process(icl_baseline.main, args(tmp_path / "one"))
    result = torchrun("icl_baseline.py", args(tmp_path / "two") + ["--shard_backbone"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    assert len(two) == TEST_FIRST and two == one
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert results[1]["metrics"] == results[0]["metrics"]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` started by the launcher process `launcher`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_process_ends_the_job_and_resume_finishes_it(tiny_model_dir, rounds, tmp_path):
    epochs = "1-3:1,4-6:40"  # round 2 runs long enough to be interrupted
    run_dir = tmp_path / "killed"
    args = tokmem_args(rounds, tiny_model_dir, run_dir, epochs)
    process = subprocess.Popen(launch("main_sequential.py", args), cwd=tmp_path, env=launch_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = run_dir / "state.json"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if state.is_file() and json.loads(state.read_text())["completed_rounds"] == 1:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the job ended before round 2 could be interrupted"
        victim = worker_pid(process.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert time.monotonic() - killed_at < 60
    assert process.returncode != 0
    lines = our_lines(stderr, "main_sequential.py")
    assert len(lines) == 1 and "process 0 of 2" in lines[0], stderr[-3000:]
    assert json.loads(state.read_text())["completed_rounds"] == 1 and not (run_dir / "summary.json").exists()

    result = torchrun("main_sequential.py", args + ["--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    in_one_process(main_sequential.main, tokmem_args(rounds, tiny_model_dir, tmp_path / "one", epochs))
    resumed, one = (json.loads((path / "summary.json").read_text()) for path in (run_dir, tmp_path / "one"))
    assert resumed["matrix"] == one["matrix"]
    assert_close_state(tmp_path / "one" / "checkpoints" / "round_2", run_dir / "checkpoints" / "round_2",
                       "tool_memory.safetensors")
