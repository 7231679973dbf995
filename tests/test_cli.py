import logging

import pandas as pd
import pytest
from data_factory import write_cohort

import fedprog
from fedprog import cli
from fedprog.cli import COMMANDS, main
from fedprog.schema import ConfigError


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


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedprog {fedprog.__version__}"


def test_top_level_help_names_the_global_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--version" in out and "--debug" in out and "fedprog <command> --help" in out


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_every_command_has_a_help(words, capsys):
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    command = COMMANDS[words]
    assert out.startswith(f"usage: fedprog {' '.join(words)}")
    assert f"{command.help}." in out and f"configs/{command.config}.yaml" in out
    assert "keys (key=default  meaning):" in out


def test_command_help_shows_keys_with_defaults_meanings_and_group_options(capsys):
    assert main(["simulate", "--help"]) == 0
    out = capsys.readouterr().out
    rounds = next(line for line in out.splitlines() if line.strip().startswith("rounds="))
    assert rounds.split()[0] == "rounds=10"
    seed = next(line for line in out.splitlines() if line.strip().startswith("seed="))
    assert "global model init" in seed  # the YAML comment is the key's meaning
    strategy = next(line for line in out.splitlines() if line.strip().startswith("strategy="))
    assert "strategy=fedavg" in strategy and "fedprox" in strategy


@pytest.fixture()
def never_starts(monkeypatch):
    """Fail the test if a command's implementation is imported (errors must come before start-up)."""

    def refuse(command):
        raise AssertionError(f"{command.target} was started: the error came too late")

    monkeypatch.setattr(cli, "implementation", refuse)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["simulate", "roundz=3"], ["unknown key 'roundz'", "did you mean 'rounds'"]),
        (["simulate", "rounds=two"], ["rounds='two'", "expects int"]),
        (["simulate", "strategy=fedavgg"], ["fedavg, fedprox", "did you mean 'fedavg'"]),
        (["train", "model=transformer"], ["no such model", "survpath"]),
        (["simulate", "rounds=[1"], ["rounds=[1"]),  # Hydra's own parse error, in one line
        (["train", "data=folder"], ["data.root has no value; give data.root="]),
        (["audit", "verify"], ["path has no value; give fedprog audit verify PATH"]),
    ],
)
def test_config_errors_print_one_line_and_exit_2_before_start_up(args, words, never_starts, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fedprog {args[0]}")
    assert all(word in err for word in words), err
    assert "+roundz" not in err and "Traceback" not in err


def test_folder_dataset_with_a_root_starts_and_leaves_layout_keys_to_its_manifest(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(cli, "implementation", lambda command: lambda cfg: started.append(cfg.data.root))
    assert main(["train", "data=folder", f"data.root={tmp_path}"]) == 0
    assert started == [str(tmp_path)]


def test_debug_shows_the_traceback(never_starts):
    with pytest.raises(ConfigError, match="unknown key 'roundz'"):
        main(["--debug", "simulate", "roundz=3"])


def test_log_lines_round_numbers_and_quiet_third_party_chatter():
    cli.configure_logging()
    try:
        args = ({"median": 25.509999999999998}, 0.1 + 0.2)
        record = logging.LogRecord("fedprog.x", logging.INFO, __file__, 1, "cohort %s: %s", args, None)
        cli.RoundNumbers().filter(record)
        assert record.getMessage() == "cohort {'median': 25.51}: 0.3"
        assert cli.round_numbers([1, True, "x"]) == [1, True, "x"]  # ints, bools and text untouched
        assert not logging.getLogger("alembic.runtime.plugins").isEnabledFor(logging.INFO)
        assert logging.getLogger("fedprog.federated").isEnabledFor(logging.INFO)
    finally:
        logging.basicConfig(force=True)


@pytest.mark.parametrize("path", ["/tmp/my data,1", "/tmp/it's [x]", "C:\\runs\\", "a\\'b"])
def test_positional_argument_arrives_intact(path):
    from fedprog.config import load_config

    assert load_config("audit", [cli._overrides(("audit", "verify"), [path])[0]]).path == path


def test_help_of_a_group_lists_its_keys(capsys):
    assert main(["simulate", "--help", "training"]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert "training.device=auto" in lines and "training.max_patches=4096" in lines
    assert "training.epochs=2" in lines  # the value simulate.yaml sets, not the group's default
    assert all(line.startswith("training.") for line in lines)


def test_many_positionals_fill_a_list_key(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "implementation", lambda command: lambda cfg: seen.update(runs=list(cfg.runs)))
    assert main(["compare", "runs/a b", "runs/c"]) == 0
    assert seen["runs"] == ["runs/a b", "runs/c"]
    with pytest.raises(SystemExit, match="unexpected argument"):
        main(["data", "check", "a", "b"])  # a single positional stays single


def test_site_fab_hash_prints_the_hash_sites_pin(monkeypatch, capsys, tmp_path):
    from fedprog.deploy import site

    monkeypatch.setattr(site, "print_fab_hash", lambda app: print(f"hash-of {app}") or "x")
    assert main(["site", "fab-hash", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"hash-of {tmp_path}"
