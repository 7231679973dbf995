"""simulations/coxnet_reference.py: pooled multi-cohort sources and leave-one-cancer-out (tiny folder)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from data_factory import write_cohort

REPO = Path(__file__).resolve().parents[1]
COHORTS = ("c0", "c1", "c2", "c3")


def _coxnet() -> ModuleType:
    path = REPO / "simulations" / "coxnet_reference.py"
    spec = importlib.util.spec_from_file_location("bench_coxnet_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    for i, cohort in enumerate(COHORTS):
        write_cohort(root, cohort, n_cases=40, n_genes=20, n_groups=4, with_bags=False, seed=i)
    return root


def _run(folder: Path, out: Path, *extra: str, modality: str = "expression") -> pd.DataFrame:
    argv = ["--seeds", "0", "1", "--n-alphas", "8", "--out", str(out), "--modality", modality, *extra]
    argv += ["data=folder", f"data.root={folder}"]
    assert _coxnet().main(argv) == 0
    (written,) = out.glob(f"coxnet_reference_{modality}*.json")
    return pd.DataFrame(json.loads(written.read_text())["records"])


def _scramble_outcomes(folder: Path, cohort: str) -> None:
    """New survival times and event flags for every case of ``cohort`` (the same on each of its slides)."""
    path = folder / cohort / "labels.csv"
    labels = pd.read_csv(path)
    rng = np.random.default_rng(123)
    cases = labels["case_id"].unique()
    times = dict(zip(cases, np.round(rng.exponential(30.0, len(cases)) + 0.5, 2), strict=True))
    events = dict(zip(cases, (np.arange(len(cases)) % 2).astype(int), strict=True))
    labels["survival_months"] = labels["case_id"].map(times)
    labels["censorship"] = labels["case_id"].map(events)
    labels.to_csv(path, index=False)


def test_pooled_source_scores_the_target_and_never_selects_on_it(folder: Path, tmp_path: Path) -> None:
    pooled = ["sources=[[c0,c1,c2]]", "targets=[c3]"]
    before = _run(folder, tmp_path / "before", *pooled)
    assert set(before["source"]) == {"c0+c1+c2"}
    target = before[before["split"] == "target"]
    assert set(target["target"]) == {"c3"} and (target["n"] == 40).all()
    assert np.isfinite(target["c_index"]).all() and target["c_index"].between(0, 1).all()
    # the in-domain split is the pooled validation cases of the three source cohorts (20% of 40 each)
    assert (before.loc[before["split"] != "target", "n"] == 3 * 8).all()

    _scramble_outcomes(folder, "c3")
    after = _run(folder, tmp_path / "after", *pooled)
    source_side = ["seed", "alpha", "n_nonzero"]
    pd.testing.assert_frame_equal(before[source_side], after[source_side])
    in_domain = before["split"] != "target"
    assert before.loc[in_domain, "c_index"].tolist() == after.loc[in_domain, "c_index"].tolist()
    assert before.loc[~in_domain, "c_index"].tolist() != after.loc[~in_domain, "c_index"].tolist()


def test_pooled_split_and_features_match_the_protocol(folder: Path) -> None:
    from fedprog.config import load_config
    from fedprog.data import load_cohorts
    from fedprog.pipeline import fit_preprocessing
    from fedprog.protocol import prepare_layout, split_cases

    module = _coxnet()
    args = module.parse_args(["--n-alphas", "5"])
    layout = prepare_layout(load_config("train", ["data=folder", f"data.root={folder}"]).data)
    cohorts = load_cohorts(layout)
    features = module.Features(cohorts, layout, args)
    _, _, val = module.fit_source(features, ["c0", "c1"], 3, args)
    assert val == {c: split_cases(cohorts[c], args.val_fraction, 3)[1] for c in ("c0", "c1")}
    train = {c: split_cases(cohorts[c], args.val_fraction, 3)[0] for c in ("c0", "c1")}
    prep = fit_preprocessing(layout, cohorts, train, n_bins=4)
    assert prep.expression is not None and features.expression is not None
    ours = pd.Series(features.expression.mean, index=features.expression.genes)
    theirs = pd.Series(prep.expression.mean, index=prep.expression.genes)
    assert sorted(ours.index) == sorted(theirs.index)  # the genes the pooled sources fix
    np.testing.assert_allclose(ours.loc[theirs.index], theirs)  # moments of the pooled training cases


def test_loco_holds_out_each_cohort_with_a_bootstrap_ci(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = _run(folder, tmp_path / "loco", "--loco", "--n-boot", "50")
    targets = records[records["split"] == "target"]
    assert sorted(targets["target"].unique()) == list(COHORTS)
    for target, rows in targets.groupby("target"):
        assert set(rows["source"]) == {"+".join(c for c in COHORTS if c != target)}
        assert sorted(rows["seed"]) == [0, 1]
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "| overall" in printed
    mean_c3 = targets.loc[targets["target"] == "c3", "c_index"].mean()
    (row,) = [line for line in printed.splitlines() if line.startswith("| c3 ")]
    assert not math.isnan(mean_c3) and f"{mean_c3:.3f}" in row


def test_loco_refuses_sources(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop sources="):
        _run(folder, tmp_path / "x", "--loco", "sources=[c0]")


def test_both_puts_the_clinical_columns_beside_the_genes(folder: Path) -> None:
    from fedprog.config import load_config
    from fedprog.data import load_cohorts
    from fedprog.data.groups import load_groups
    from fedprog.protocol import prepare_layout

    module = _coxnet()
    overrides = ["data=folder", f"data.root={folder}", "data.strong=clinical"]
    layout = prepare_layout(load_config("train", overrides).data)
    cohorts = load_cohorts(layout)
    ids = list(cohorts["c1"].case_ids)
    parts = {"c0": list(cohorts["c0"].case_ids)}
    blocks = {}
    for modality in ("clinical", "expression", "both"):  # fitted on c0, applied to c1
        args = module.parse_args(["--modality", modality])
        blocks[modality] = module.Features(cohorts, layout, args).fit(parts)("c1", ids)
    np.testing.assert_array_equal(blocks["both"], np.hstack([blocks["clinical"], blocks["expression"]]))
    assert blocks["expression"].shape == (len(ids), 20) and blocks["clinical"].shape[1] >= 2

    args = module.parse_args(["--modality", "clinical_pathways"])
    features = module.Features(cohorts, layout, args).fit(parts)
    scores = features("c1", ids)[:, blocks["clinical"].shape[1] :]
    assert scores.shape == (len(ids), 4)  # one score per gene group of the folder
    groups = load_groups(layout).restrict(features.genes).indices(features.genes)
    for column, index in enumerate(groups):
        np.testing.assert_allclose(scores[:, column], blocks["expression"][:, index].mean(axis=1), rtol=1e-5)


def test_loco_writes_a_rotation_that_fedprog_compare_pairs(folder: Path, tmp_path: Path) -> None:
    from fedprog.compare import compare

    out = tmp_path / "runs"
    _run(folder, out, "--loco", "--n-boot", "20", "data.strong=clinical", modality="clinical")
    _run(folder, out, "--loco", "--n-boot", "20")
    clinical, expression = out / "coxnet_clinical_loco", out / "coxnet_expression_loco"
    rotation = json.loads((clinical / "rotation.json").read_text())
    assert rotation["setting"]["label"] == "coxnet_clinical"
    assert sorted(row["target"] for row in rotation["summary"]) == [*COHORTS, "overall"]
    tables = compare([clinical, expression], tmp_path / "cmp", n_boot=20)
    paired = tables["paired"]
    assert "coxnet_expression" in paired.to_string() and set(COHORTS) <= set(paired["target"])
    assert (tmp_path / "cmp" / "forest.png").is_file()
