"""round_files: the names of a round's files, the command that makes them, manifests; per-round cap padding."""

from __future__ import annotations

from pathlib import Path

import pytest

import round_files
from common import UserError
from experiment import RoundSpec, make_data_command, per_round_values


def test_round_paths_have_the_design_names():
    paths = round_files.round_paths("data", 21, 40, 4, 3)
    assert [p.as_posix() for p in paths] == [
        "data/training/function_calling_train_tools21-40_4calls.json",
        "data/test/function_calling_test_tools21-40_3calls.json",
        "data/tool_descriptions_tools21-40.json",
    ]
    assert round_files.manifest_path("data", 21, 40).as_posix() == "data/manifest_tools21-40.json"


def test_parse_test_path_reads_range_and_cap_back():
    assert round_files.parse_test_path("runs/x/test/function_calling_test_tools21-40_3calls.json") == (
        Path("runs/x"), 21, 40, 3)
    for other in ("mine.json", "test/function_calling_test_tools21-40_3calls.jsonl",
                  "test/function_calling_train_tools1-5_3calls.json"):
        assert round_files.parse_test_path(other) is None


def test_cli_prints_the_test_file_path_the_scripts_pass_on(capsys):
    assert round_files.main(["--data_dir", "d", "--start", "21", "--end", "40", "--test_max_function_calls", "3"]) == 0
    assert capsys.readouterr().out == "d/test/function_calling_test_tools21-40_3calls.json\n"


def test_data_command_names_the_flags_given_and_quotes_paths():
    assert round_files.data_command("data", 1, 3, 4, 2) == (
        "python xlam_datasets.py --top_k 1-3 --train_max_function_calls 4 --test_max_function_calls 2 "
        "--output_dir data")
    assert round_files.data_command("my data", 7, 9, test_calls=2) == (
        "python xlam_datasets.py --top_k 7-9 --test_max_function_calls 2 --output_dir 'my data'")
    assert make_data_command("d", RoundSpec(4, 6, 1), 3, 3) == (
        "python xlam_datasets.py --top_k 4-6 --train_max_function_calls 3 --test_max_function_calls 3 --output_dir d")


def test_setting_changes_name_old_and_new_values():
    assert round_files.setting_changes({"seed": 1, "train_size": 9}, {"seed": 1, "train_size": 10, "recut": "x"}) == [
        'recut null -> "x"', "train_size 9 -> 10"]


def test_provenance_without_a_manifest_says_so(tmp_path):
    provenance = round_files.read_provenance(tmp_path, 1, 3, 4, 4)
    assert provenance["settings"] is None and not provenance["files_match"]
    (tmp_path / "manifest_tools1-3.json").write_text("{broken")
    assert round_files.read_provenance(tmp_path, 1, 3, 4, 4)["settings"] is None


@pytest.mark.parametrize("text, rounds, expected", [
    (None, 3, [4, 4, 4]),
    ("2", 3, [2, 2, 2]),
    ("1,2", 4, [1, 2, 2, 2]),
    ("3, 1, 2", 3, [3, 1, 2]),
])
def test_per_round_values_pads_a_short_list_with_its_last_value(text, rounds, expected):
    assert per_round_values("--test_max_function_calls_per_round", text, 4, rounds) == expected


@pytest.mark.parametrize("text, message", [("1,2,3,4", "4 values for 3 rounds"), ("1,x", "integers"),
                                           ("2,0", ">= 1")])
def test_per_round_values_refuses_a_long_or_bad_list(text, message):
    with pytest.raises(UserError, match=message):
        per_round_values("--x", text, 4, 3)
