import pandas as pd
import pytest
from data_factory import write_cohort

from fedprog.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


def test_unknown_command_names_it():
    with pytest.raises(SystemExit, match="unknown command 'frobnicate'"):
        main(["frobnicate"])


def test_unexpected_positional_is_refused():
    with pytest.raises(SystemExit, match="unexpected argument"):
        main(["synth", "somewhere"])


def test_data_check_passes_and_prints_a_summary(tmp_path, capsys):
    write_cohort(tmp_path, "c0", n_cases=12)
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "c0" in out and "12" in out


def test_data_check_on_a_corrupted_copy_names_file_and_column(tmp_path, capsys):
    write_cohort(tmp_path, "c0", n_cases=12)
    labels = tmp_path / "c0" / "labels.csv"
    frame = pd.read_csv(labels, dtype={"survival_months": str})
    frame.loc[3, "survival_months"] = "soon"
    frame.to_csv(labels, index=False)
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "labels.csv" in err and "survival_months" in err
