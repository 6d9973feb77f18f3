"""`--rng original`: one seed, then every draw from torch's global generator in the original toolkit's order.

The original seeds once (random, numpy, torch) and then draws, in program order: peft's LoRA initialisation as the
backbone is wrapped, one orthogonal matrix over its tool slots (the last round's last rank, at most 248 rows), the
DataLoader's two draws at the start of every epoch (its iterator's base seed, its sampler's seed), one draw for each
test loader's iterator (its base seed), and LoRA's dropout masks in every training forward (a frozen adapter's too,
since the model stays in training mode). These tests recompute each draw independently in that order and compare bit
for bit; the end-to-end comparison against the original's own code is in docs/paper.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT, TOOL_NAMES, kill_in_round_two, make_sample, numbers, run_to_end
from dataset import NativeFunctionCallingDataset, make_dataloader
from model import FunctionCallingModel, LoraSettings, attach_lora

LORA = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"))


def test_rows_and_lora_come_from_the_global_generator_in_the_originals_order(tiny_model_dir):
    torch.manual_seed(11)
    model = FunctionCallingModel(str(tiny_model_dir), 3, TOOL_NAMES[:3], device="cpu", lora_config=LORA)
    model.initialize_rows(seed=None, norm="unit", drawn_rows=6)

    torch.manual_seed(11)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    reference = attach_lora(base, LORA)
    slots = torch.empty(6, model.memory.input_rows.shape[1])
    torch.nn.init.orthogonal_(slots)

    ours = {n: p for n, p in model.base_model.named_parameters() if "lora_A" in n}
    theirs = {n: p for n, p in reference.named_parameters() if "lora_A" in n}
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert torch.equal(model.memory.input_rows, slots[:3])  # the first slots, orthonormal as drawn: not re-normalised
    assert torch.allclose(model.memory.input_rows.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_a_seeded_initialisation_leaves_the_global_generator_alone(tiny_model_dir):
    model = FunctionCallingModel(str(tiny_model_dir), 3, TOOL_NAMES[:3], device="cpu")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model.initialize_rows(seed=5)
    assert torch.equal(torch.get_rng_state(), before)


def test_each_epoch_shuffles_from_the_global_generator(tiny_model_dir):
    model = FunctionCallingModel(str(tiny_model_dir), 3, TOOL_NAMES[:3], device="cpu")
    samples = [make_sample([TOOL_NAMES[i % 3]], [{"q": str(i)}], f"query number {i}") for i in range(7)]
    dataset = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, 64, "train")
    loader = make_dataloader(dataset, 7, model.tokenizer.pad_token_id, shuffle=True, seed=None)

    def order(batch) -> list[int]:
        return [int(query.rsplit(" ", 1)[1]) for query in batch["user_input"]]

    torch.manual_seed(3)
    epochs = [order(next(iter(loader))) for _ in range(2)]
    torch.manual_seed(3)
    expected = []
    for _ in range(2):  # per epoch: the loader iterator's base seed, then RandomSampler's seed of its permutation
        torch.empty((), dtype=torch.int64).random_()
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        expected.append(torch.randperm(7, generator=torch.Generator().manual_seed(seed)).tolist())
    assert epochs == expected and epochs[0] != epochs[1]


def original_args(model_dir, data, out) -> list[str]:
    return ["--model_name", str(model_dir), "--training_rounds", "1-3:2,4-6:2", "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "2", "--max_new_tokens", "12", "--device", "cpu",
            "--seed", "9", "--use_lora", "--freeze_lora_after_first", "--lora_dropout", "0.3",
            "--lora_target_modules", "q_proj,v_proj", "--tool_init_norm", "unit", "--max_grad_norm", "0",
            "--offer_all_tools", "--unconstrained_decoding", "--eval_all_previous", "--rng", "original"]


@pytest.mark.slow
def test_original_rng_repeats_and_resumes_exactly(tiny_model_dir, two_round_data, tmp_path):
    whole = run_to_end("main_sequential.py", original_args(tiny_model_dir, two_round_data, tmp_path / "a"), tmp_path)
    again = run_to_end("main_sequential.py", original_args(tiny_model_dir, two_round_data, tmp_path / "b"), tmp_path)
    assert numbers(again) == numbers(whole)
    # killed after round 1 and resumed: round 2 draws its shuffles and dropout masks from the saved generator state
    args = original_args(tiny_model_dir, two_round_data, tmp_path / "c")
    kill_in_round_two("main_sequential.py", args, tmp_path)
    resumed = run_to_end("main_sequential.py", [*args, "--resume"], tmp_path)
    assert numbers(resumed) == numbers(whole)
    # the toolkit's own streams give another run from the same seed
    toolkit = run_to_end("main_sequential.py", [*original_args(tiny_model_dir, two_round_data, tmp_path / "d")[:-2]],
                         tmp_path)
    assert numbers(toolkit)["round_stats"] != numbers(whole)["round_stats"]


def test_original_rng_refuses_several_processes(tiny_model_dir, two_round_data, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main_sequential.py"),
                             *original_args(tiny_model_dir, two_round_data, out)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "error: --rng original draws every random number in one process's program order, so it cannot run under "
        "several processes (WORLD_SIZE > 1); use --rng toolkit")
    assert not out.exists()


def test_original_rng_refuses_a_split_training_pass(tiny_model_dir, two_round_data, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main_sequential.py"),
                             *original_args(tiny_model_dir, two_round_data, out), "--training_pass", "split"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "error: --training_pass split: --rng original runs each batch in one pass, as the original does (its dropout "
        "masks have the one-pass shapes); use one or auto")
    assert not out.exists()
