"""The benchmark scripts take data=, data.root=, sources= and targets= like the commands (tiny folder)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
from data_factory import write_cohort

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "simulations" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    for i, cohort in enumerate(("c0", "c1", "c2")):
        write_cohort(root, cohort, n_cases=40, n_genes=20, n_groups=4, seed=i)
    rna = root / "c1" / "rna.csv.gz"
    pd.read_csv(rna).drop(columns=["G004"]).to_csv(rna, index=False)  # a target lacking one source gene
    return root


def test_merge_overrides_replaces_the_preset_data_group() -> None:
    merge = _script("cross_cancer").merge_overrides
    merged = merge(
        ["data=tcga", "seeds=[0,1,2]", "model.dim=64"], ["model=snn"], ["data=folder", "seeds=[0]"]
    )
    assert merged == ["model.dim=64", "model=snn", "data=folder", "seeds=[0]"]


def test_cross_cancer_on_a_folder_with_sources_and_targets(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [
        "synth",
        "only=snn",
        f"bench_out={tmp_path / 'bench'}",
        "data=folder",
        f"data.root={folder}",
        "sources=[c0]",
        "targets=[c1]",
        "seeds=[0]",
        "training.epochs=1",
        "training.grad_accum=4",
        "training.select_on=last",
        "model.dim=8",
        f"out={tmp_path / 'train'}",
    ]
    assert _script("cross_cancer").main(argv) == 0
    (written,) = (tmp_path / "bench").glob("cross_cancer_synth_*.json")
    records = pd.DataFrame(json.loads(written.read_text()))
    targets = records[records["split"] == "target"]
    assert set(targets["source"]) == {"c0"} and set(targets["target"]) == {"c1"}


def test_coxnet_reference_on_a_folder_with_sources_and_targets(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["--seeds", "0", "--n-alphas", "5", "--out", str(out)]
    argv += ["data=folder", f"data.root={folder}", "sources=[c0]", "targets=[c1,c2]"]
    assert _script("coxnet_reference").main(argv) == 0
    records = pd.DataFrame(json.loads((out / "coxnet_reference_expression.json").read_text())["records"])
    assert set(records["source"]) == {"c0"}
    assert set(records.loc[records["split"] == "target", "target"]) == {"c1", "c2"}
    assert records["c_index"].between(0, 1).all()


def _fake_rotation(folder: Path, label: str, shift: float) -> None:
    """A finished rotation over the four TCGA targets and seeds 0-1: risk = true order + noise + ``shift``."""
    import numpy as np

    from fedprog.compare import prediction_frame, write_rotation

    rng = np.random.default_rng(0)
    frames = []
    for t, target in enumerate(("blca", "brca", "hnsc", "stad")):
        time = rng.exponential(30.0, 60) + 1.0
        censorship = (rng.random(60) < 0.4).astype(int)
        ids = [f"{target}-{i:03d}" for i in range(60)]
        for seed in (0, 1):
            noise = np.random.default_rng([t, seed, int(shift * 100)]).normal(0, 1 + shift, 60)
            risk = -np.log(time) + noise
            frames.append(prediction_frame(target, seed, target, ids, time, censorship, risk))
    folder.mkdir(parents=True)
    write_rotation(folder, {"label": label}, pd.concat(frames, ignore_index=True), n_boot=20)


def test_tcga_loco_compares_every_setting_to_the_clinical_coxnet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _script("tcga_loco")
    for label, shift in (("coxnet_clinical_loco", 3.0), ("fedavg", 0.0), ("pooled", 1.0)):
        _fake_rotation(tmp_path / label, label.removesuffix("_loco"), shift)
    assert module.covers(tmp_path / "fedavg", ["blca", "brca", "hnsc", "stad"], [0, 1])
    assert not module.covers(tmp_path / "fedavg", ["blca", "brca", "hnsc", "stad"], [0, 1, 2])
    argv = [
        "--report-only",
        "--root",
        str(tmp_path),
        "--settings",
        "fedavg",
        "pooled",
        "--coxnet",
        "clinical",
    ]
    assert module.main([*argv, "--n-boot", "20"]) == 0
    printed = capsys.readouterr().out
    assert "| fedavg - coxnet_clinical |" in printed and "| fedavg - pooled |" in printed
    (last,) = [line for line in printed.splitlines() if line.startswith("tcga_loco:")]
    assert "fedavg - coxnet_clinical +" in last  # the less noisy risk ranks better
    assert (tmp_path / "compare" / "forest.png").is_file() and (tmp_path / "compare_fedavg").is_dir()


def test_tcga_loco_refuses_to_compare_without_the_reference(tmp_path: Path) -> None:
    _fake_rotation(tmp_path / "fedavg", "fedavg", 0.5)
    with pytest.raises(RuntimeError, match="nothing to compare"):
        _script("tcga_loco").main(["--report-only", "--root", str(tmp_path), "--settings", "fedavg"])


def test_information_ceiling_equals_the_transfer_ceiling_when_the_wsi_sees_z_exactly(tmp_path: Path) -> None:
    """simulations/information_ceiling.py: with no WSI noise the posterior ranks patients as beta' z does."""
    small = [
        f"data.root={tmp_path / 'synth'}",
        "data.synth.n_patients=[40,40,40,40,40,40]",
        "data.synth.patches=[8,16]",
        "data.synth.n_genes=40",
        "data.synth.n_pathways=5",
    ]
    ceilings = _script("information_ceiling").ceilings
    exact = ceilings([*small, "data.synth.wsi.shared_noise=1e-6"], draws=2)
    assert list(exact["cancer"]) == ["c0", "c1", "c2", "c3", "c4", "c5", "mean"]
    pd.testing.assert_series_equal(
        exact["information, WSI"], exact["transfer ceiling"], check_names=False, atol=1e-9, rtol=0
    )
    noisy = ceilings(small, draws=2)  # the default WSI noise: the same patients, a lower information ceiling
    assert (noisy["information, WSI"] < noisy["transfer ceiling"]).iloc[-1]
    assert noisy["transfer ceiling"].iloc[-1] == pytest.approx(exact["transfer ceiling"].iloc[-1], abs=0.05)
