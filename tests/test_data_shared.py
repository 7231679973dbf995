"""The real data under ../shared/data: TCGA cohorts (README counts) and FLamby Fed-TCGA-BRCA (split sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHARED

from fedprog.config import config_dir, load_config
from fedprog.data import (
    DatasetLayout,
    LayoutError,
    SurvivalBins,
    SurvivalDataset,
    build_sites,
    check_dataset,
    collate,
    load_cohort,
    load_cohorts,
    tabular_transform_for,
    tss_counts,
)

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"{SHARED / 'data'} is absent"),
    pytest.mark.skipif(
        not (config_dir() / "data" / "synth.yaml").is_file(), reason="configs/data/synth.yaml absent"
    ),
]
# README of shared/data/tcga: cases, events, TSS count before merging, reverse-KM median follow-up (months).
TCGA = {
    "blca": (373, 169, 33, 29.5),
    "brca": (956, 130, 37, 32.0),
    "hnsc": (416, 197, 25, 37.2),
    "stad": (349, 140, 22, 24.4),
}
# README of shared/data/fed_tcga_brca: client k -> (region, train, test, train events, test events).
FLAMBY = [
    ("Northeast", 248, 63, 45, 14),
    ("South", 156, 40, 35, 4),
    ("West", 164, 42, 14, 8),
    ("Midwest", 129, 33, 16, 3),
    ("Europe", 129, 33, 7, 2),
    ("Canada", 40, 11, 2, 1),
]


@pytest.fixture(scope="module")
def tcga() -> DatasetLayout:
    if not (SHARED / "data" / "tcga").is_dir():
        pytest.skip("shared TCGA data absent")
    return DatasetLayout.load(load_config("data_check", ["data=tcga"]).data)


def test_tcga_counts(tcga: DatasetLayout) -> None:
    summary = check_dataset(tcga).to_frame()
    for cohort, (cases, events, n_tss, followup) in TCGA.items():
        assert summary.loc[cohort, "cases"] == cases
        assert summary.loc[cohort, "events"] == events
        assert summary.loc[cohort, "sites"] == n_tss
        assert summary.loc[cohort, "median_followup"] == pytest.approx(followup, abs=0.05)
    # each cohort reports its own genes; the total is what the 4 cohorts share (gene_policy=intersection)
    assert summary["genes"].to_dict() == {
        "blca": 1554,
        "brca": 1558,
        "hnsc": 1557,
        "stad": 1558,
        "total": 1553,
    }
    assert summary.loc["total", "groups"] == 50


def test_tcga_tss_partition(tcga: DatasetLayout) -> None:
    cohorts = load_cohorts(tcga)
    for name, (_, _, n_tss, _) in TCGA.items():
        assert len(tss_counts(cohorts[name])) == n_tss
    assert tss_counts(cohorts["hnsc"]).iloc[0] == 130  # CV
    fed = load_config("data_check", ["data=tcga", "+federation=tcga_tss"]).federation
    sites = build_sites(tcga, fed, heldout=["stad"], cohorts=cohorts)
    per_cohort = {c: sum(1 for s in sites if s.cohort == c) for c in TCGA}
    assert per_cohort == {"blca": 7, "brca": 10, "hnsc": 5, "stad": 6}  # >= 20 cases, >= 3 events, + other
    labels = {c: cohorts[c].labels for c in TCGA}
    events = {s.name: int((labels[s.cohort].loc[list(s.case_ids), "censorship"] == 0).sum()) for s in sites}
    assert min(events.values()) >= 3  # every site is above the disclosure minimums: simulate can start
    assert {s.role for s in sites if s.cohort == "stad"} == {"holdout"}
    assert sum(len(s.case_ids) for s in sites) == sum(v[0] for v in TCGA.values())


def test_tcga_one_site_per_cancer_preset(tcga: DatasetLayout) -> None:
    fed = load_config("data_check", ["data=tcga", "+federation=per_cohort"]).federation
    sites = build_sites(tcga, fed, heldout=["stad"])
    assert sorted(s.name for s in sites) == sorted(TCGA) and all(s.name == s.cohort for s in sites)
    assert {s.name: s.role for s in sites}["stad"] == "holdout"


def test_tcga_clinical_strong_modality_and_no_wsi(tcga: DatasetLayout) -> None:
    stad = load_cohort(tcga, "stad")
    assert list(stad.tables["clinical"].columns) == ["age", "is_female", "stage"]
    strong = tabular_transform_for(tcga).fit(stad.tables["clinical"])
    assert "age__missing" in strong.feature_names and "stage=III" in strong.feature_names
    with pytest.raises(LayoutError, match=r"strong='wsi' needs WSI bags but 'features' is null"):
        DatasetLayout.load(load_config("data_check", ["data=tcga", "data.strong=wsi"]).data)


def test_flamby_split_sizes() -> None:
    if not (SHARED / "data" / "fed_tcga_brca").is_dir():
        pytest.skip("shared FLamby data absent")
    cfg = load_config("data_check", ["data=fed_tcga_brca", "+federation=fed_tcga_brca"])
    layout = DatasetLayout.load(cfg.data)
    cohort = load_cohort(layout, "brca")
    assert len(cohort) == 1088 and len(cohort.dropped) == 8
    assert cohort.tables["clinical"].shape == (1088, 39)
    assert (cohort.labels["split"] == "train").sum() == 866 and (
        cohort.labels["split"] == "test"
    ).sum() == 222
    sites = build_sites(layout, cfg.federation, cohorts={"brca": cohort})
    got = []
    for site in sites:
        cens = cohort.labels["censorship"]
        events = (int((cens[list(site.case_ids)] == 0).sum()), int((cens[list(site.test_ids)] == 0).sum()))
        got.append((site.name, len(site.case_ids), len(site.test_ids), *events))
    assert got == FLAMBY
    assert (cohort.labels.groupby("site")["center"].nunique() == 1).all()
    train_ids = [c for s in sites for c in s.case_ids]
    bins = SurvivalBins.fit(
        cohort.labels.loc[train_ids, "survival_months"], cohort.labels.loc[train_ids, "censorship"]
    )
    strong = tabular_transform_for(layout).fit(cohort.tables["clinical"].loc[train_ids])
    ds = SurvivalDataset(
        cohort, sites[5].test_ids, expression_transform=None, strong_transform=strong, bins=bins, groups=None
    )
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.strong.shape == (11, 39, 1) and batch.expression.shape == (11, 0)
    assert float(batch.strong[:, 0, 0].max()) <= 90  # raw age (FLamby feeds raw features)


def test_flamby_federation_clears_the_pre_start_disclosure_check(tmp_path: Path) -> None:
    """Canada's test split holds 1 event: as a training site it only evaluates (no KM curves), so the
    benchmark starts; held out, it would be asked for KM curves and is refused before start-up."""
    if not (SHARED / "data" / "fed_tcga_brca").is_dir():
        pytest.skip("shared FLamby data absent")
    from fedprog.data import SiteError
    from fedprog.federated import simulation

    flamby = ["data=fed_tcga_brca", "federation=fed_tcga_brca", "model=linear_cox", "training.loss=cox"]
    simulation.check_site_sizes(load_config("simulate", [*flamby, "heldout=null"]))
    with pytest.raises(SiteError, match=r"Canada \(11 cases, 1 events\)"):
        simulation.check_site_sizes(load_config("simulate", [*flamby, "heldout=[Canada]"]))


def test_shared_root_comes_from_config(tcga: DatasetLayout) -> None:
    assert tcga.root == (SHARED / "data" / "tcga").resolve()
    assert Path(tcga.root / "README.md").is_file()
