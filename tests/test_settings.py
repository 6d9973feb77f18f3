"""Typed settings: each CLI's flags become its dataclasses once, every flag default is its field's default, and the
recorded flags hold every flag."""

from __future__ import annotations

import pytest

import icl_baseline
import lora_sequential
import main_sequential
from lora_sequential import BaselineSettings
from main_sequential import MemorySettings
from model import LoraSettings
from replay_buffer import ReplaySettings
from settings import DataSettings, DecodingSettings, EvalSettings, ModelSettings, OutputSettings
from training import TrainSettings

ROUNDS = ["--training_rounds", "1-3:1,4-6:2"]


def test_tokmem_flag_defaults_are_the_settings_defaults():
    settings, memory = main_sequential.settings_from(main_sequential.build_parser().parse_args(ROUNDS))
    assert settings.data == DataSettings("1-3:1,4-6:2")
    assert settings.train == TrainSettings()
    assert settings.evaluation == EvalSettings() and settings.decoding == DecodingSettings()
    assert settings.model == ModelSettings() and settings.output == OutputSettings()
    assert settings.lora is None and memory == MemorySettings() and settings.seed == 42


def test_lora_baseline_defaults_train_the_adapter_at_the_lora_rate():
    settings, baseline = lora_sequential.settings_from(lora_sequential.build_parser().parse_args(ROUNDS))
    assert settings.train == TrainSettings(lr=5e-4, lora_lr=5e-4)
    assert settings.lora == LoraSettings(r=8, alpha=32, dropout=0.1,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert settings.decoding == DecodingSettings() and baseline == BaselineSettings()
    args = lora_sequential.build_parser().parse_args(ROUNDS + ["--use_replay_buffer"])
    assert lora_sequential.settings_from(args)[1].replay == ReplaySettings(1000, 0.2, "reservoir")


def test_every_tokmem_flag_reaches_its_setting():
    argv = ROUNDS + [
        "--data_dir", "d", "--train_max_function_calls_per_round", "3,2", "--test_max_function_calls", "2",
        "--max_length", "300", "--prompt_format", "original", "--batch_size", "3", "--gradient_accumulation_steps", "2",
        "--lr", "0.02", "--lora_lr", "1e-4", "--max_grad_norm", "0", "--curriculum_learning", "--use_lora",
        "--lora_r", "4", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_target_modules", "q_proj, v_proj",
        "--lora_layer_indices=-1,0", "--renorm_active_tools", "--renorm_rows", "output", "--renorm_from_round", "3",
        "--eval_all_previous", "--eval_batch_size", "5", "--demo", "2", "--max_new_tokens", "40", "--device", "cpu",
        "--dtype", "float32", "--model_name", "m", "--offer_all_tools", "--unconstrained_decoding",
        "--use_ground_truth_tools", "--ground_truth_style", "replace", "--decouple_embeddings", "--tool_init_norm",
        "unit", "--memory_dtype", "model", "--freeze_lora_after_first", "--seed", "7", "--output_dir", "o",
        "--save_checkpoints", "--checkpoint_dir", "c", "--log_file", "l.log",
    ]
    settings, memory = main_sequential.settings_from(main_sequential.build_parser().parse_args(argv))
    assert settings.data == DataSettings("1-3:1,4-6:2", "d", 4, "3,2", 2, None, 300, "original")
    assert settings.train == TrainSettings(lr=0.02, lora_lr=1e-4, gradient_accumulation_steps=2, max_grad_norm=0.0,
                                           renorm_active_tools=True, renorm_rows="output", renorm_from_round=3,
                                           batch_size=3, curriculum_learning=True)
    assert settings.lora == LoraSettings(4, 16, 0.05, ["q_proj", "v_proj"], [-1, 0])
    assert settings.evaluation == EvalSettings(False, True, 5, 2)
    assert settings.decoding == DecodingSettings(True, True, True, "replace")
    assert settings.model == ModelSettings("m", "cpu", "float32", 40)
    assert settings.output == OutputSettings("o", False, "l.log", "c", True)
    assert memory == MemorySettings(True, "unit", "model", True, True) and settings.seed == 7
    assert not memory.train_lora_in(1) and memory.train_lora_in(0)


@pytest.mark.parametrize("module", [main_sequential, lora_sequential])
def test_the_recorded_flags_are_every_flag(module):
    parser = module.build_parser()
    settings, _ = module.settings_from(parser.parse_args(ROUNDS + ["--batch_size", "4"]))
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert set(settings.flags) == dests and settings.flags["batch_size"] == 4


def test_a_round_renormalises_from_the_asked_round_with_its_own_epochs():
    run = TrainSettings(renorm_active_tools=True, renorm_from_round=2, epochs=9)
    assert run.for_round(0, 3) == TrainSettings(renorm_active_tools=False, renorm_from_round=2, epochs=3)
    assert run.for_round(1, 1).renorm_active_tools and run.for_round(1, 1).epochs == 1
    assert not TrainSettings().for_round(5, 1).renorm_active_tools


def test_icl_flag_defaults_are_the_settings_defaults():
    args = icl_baseline.build_parser().parse_args(["--test_data", "t.json"])
    assert icl_baseline.from_flags(icl_baseline.IclSettings, args) == icl_baseline.IclSettings(["t.json"])
    assert icl_baseline.from_flags(icl_baseline.RetrievalSettings, args) == icl_baseline.RetrievalSettings()
    assert icl_baseline.from_flags(ModelSettings, args) == ModelSettings()
