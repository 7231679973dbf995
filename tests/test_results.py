"""Run folders: time-stamped per command unless out=, never reused, with the resolved config and versions."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fed_helpers import tiny_config
from omegaconf import OmegaConf

from fedprog.config import load_config
from fedprog.results import run_folder, start_run

NOW = dt.datetime(2026, 11, 28, 6, 5, 9)


def test_default_folder_is_time_stamped_under_runs_command(tmp_path):
    folder = run_folder("simulate", None, now=NOW, runs_root=tmp_path / "runs")
    assert folder == (tmp_path / "runs" / "simulate" / "20261128-060509").resolve()
    assert folder.is_dir() and folder.is_absolute()


def test_runs_in_the_same_second_never_collide(tmp_path):
    first = run_folder("train", None, now=NOW, runs_root=tmp_path)
    (first / "results.json").write_text("{}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        others = list(pool.map(lambda _: run_folder("train", None, now=NOW, runs_root=tmp_path), range(8)))
    names = [first.name, *(folder.name for folder in others)]
    assert len(set(names)) == 9
    assert sorted(names) == sorted(["20261128-060509", *(f"20261128-060509-{i}" for i in range(2, 10))])
    assert (first / "results.json").read_text() == "{}"  # the first run's files are untouched


def test_explicit_out_is_used_as_given(tmp_path):
    folder = run_folder("simulate", tmp_path / "mine", now=NOW)
    assert folder == (tmp_path / "mine").resolve() and folder.is_dir()


def test_start_run_saves_the_resolved_config_and_versions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("train", ["seeds=[4]"])
    folder = start_run("train", cfg)
    assert folder.parent == (tmp_path / "runs" / "train").resolve()
    saved = OmegaConf.load(folder / "config.yaml")
    assert saved.out == str(folder) and list(saved.seeds) == [4]
    assert "${" not in (folder / "config.yaml").read_text()  # resolved
    versions = json.loads((folder / "versions.json").read_text())
    assert {"python", "fedprog", "torch", "flwr"} <= set(versions)


def test_simulate_gets_a_new_folder_per_run_and_none_for_a_refused_run(tmp_path, monkeypatch):
    from fedprog.federated.simulation import prepare

    monkeypatch.chdir(tmp_path)
    data_root = tmp_path / "synth"
    first = prepare(tiny_config(data_root, Path("ignored"), "out=null"))
    second = prepare(tiny_config(data_root, Path("ignored"), "out=null"))
    assert first.out != second.out
    for cfg in (first, second):
        folder = Path(cfg.out)
        assert folder.parent == (tmp_path / "runs" / "simulate").resolve()
        assert (folder / "versions.json").is_file()
    with pytest.raises(ValueError, match="zz"):  # refused before start-up: no empty run folder is left
        prepare(tiny_config(data_root, Path("ignored"), "out=null", "heldout=[zz]"))
    assert len(list((tmp_path / "runs" / "simulate").iterdir())) == 2
