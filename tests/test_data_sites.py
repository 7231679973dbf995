"""Site partitions: per cohort, per site column, per TSS with merging of small sites, from a mapping file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from data_factory import write_cohort

from fedprog.data import DatasetLayout, Site, SiteError, build_sites, load_cohort, tss_counts
from fedprog.data.cohort import tss_code


@pytest.fixture
def layout(tmp_path: Path) -> DatasetLayout:
    write_cohort(tmp_path / "ds", "c0", n_cases=20)
    return write_cohort(tmp_path / "ds", "c1", n_cases=40, seed=1)


def test_cohort_partition_with_heldout_cohort(layout: DatasetLayout) -> None:
    sites = build_sites(layout, {"partition": "cohort"}, heldout=["c1"])
    assert [(s.name, s.role, len(s.case_ids)) for s in sites] == [("c0", "train", 20), ("c1", "holdout", 40)]


def test_site_partition_and_heldout_site(layout: DatasetLayout) -> None:
    sites = build_sites(layout, {"partition": "site", "heldout": ["c0-C3"]})
    assert [s.name for s in sites] == ["c0-A1", "c0-B2", "c0-C3", "c1-A1", "c1-B2", "c1-C3"]
    assert [s.role for s in sites].count("holdout") == 1
    assert sum(len(s.case_ids) for s in sites) == 60
    ids = [c for s in sites for c in s.case_ids]
    assert len(ids) == len(set(ids))


def test_tss_partition_merging_rule(layout: DatasetLayout) -> None:
    # c1: A1 20, B2 12, C3 8 cases. min_cases 10: C3 -> c1-other (8 < 10) -> joins the largest site c1-A1.
    counts = tss_counts(load_cohort(layout, "c1"))
    assert counts.to_dict() == {"A1": 20, "B2": 12, "C3": 8}
    sites = {s.name: len(s.case_ids) for s in build_sites(layout, {"partition": "tss", "min_cases": 10})}
    assert sites["c1-A1"] == 28 and "c1-other" not in sites
    # min_cases 7: c0 B2 (6) and C3 (4) pool into c0-other (10 >= 7)
    sites = {s.name: len(s.case_ids) for s in build_sites(layout, {"partition": "tss", "min_cases": 7})}
    assert sites["c0-other"] == 10 and sites["c0-A1"] == 10 and sites["c1-C3"] == 8
    # no TSS reaches min_cases: the cohort is one site <cohort>-other
    sites = {s.name: len(s.case_ids) for s in build_sites(layout, {"partition": "tss", "min_cases": 100})}
    assert sites == {"c0-other": 20, "c1-other": 40}


def test_tss_partition_merges_sites_with_too_few_events(layout: DatasetLayout) -> None:
    cohort = load_cohort(layout, "c1")
    codes = cohort.labels.index.map(tss_code)
    events = (cohort.labels["censorship"] == 0).groupby(codes).sum()
    assert events.max() > events.min()  # the fixture has a TSS with fewer events than another
    need = int(events.min()) + 1
    sites = build_sites(layout, {"partition": "tss", "min_cases": 1, "min_events": need})
    c1 = {s.name: s.case_ids for s in sites if s.cohort == "c1"}
    assert f"c1-{events.idxmin()}" not in c1  # merged away
    assert all((cohort.labels.loc[list(ids), "censorship"] == 0).sum() >= need for ids in c1.values())
    assert sum(len(ids) for ids in c1.values()) == len(cohort.labels)  # no case dropped


def test_mapping_partition(layout: DatasetLayout, tmp_path: Path) -> None:
    mapping = tmp_path / "centers.csv"
    pd.DataFrame({"TSS Code": ["A1", "B2", "C3"], "Region": ["North", "South", "South"]}).to_csv(
        mapping, index=False
    )
    cfg = {
        "partition": "mapping",
        "cohorts": ["c0"],
        "mapping": {"path": str(mapping), "key": "tss", "key_column": "TSS Code", "site_column": "Region"},
    }
    sites = build_sites(layout, cfg, heldout=["South"])
    assert [(s.name, s.role, len(s.case_ids)) for s in sites] == [
        ("North", "train", 10),
        ("South", "holdout", 10),
    ]
    pd.DataFrame({"TSS Code": ["A1"], "Region": ["North"]}).to_csv(mapping, index=False)
    cfg["mapping"]["unmapped"] = "error"
    with pytest.raises(SiteError, match=r"centers\.csv: 10 case\(s\) of cohort 'c0' unmapped: TCGA-B2"):
        build_sites(layout, cfg)


def test_errors_name_the_culprit(layout: DatasetLayout) -> None:
    with pytest.raises(SiteError, match=r"heldout name\(s\) \['c9'\] are neither a site nor a cohort"):
        build_sites(layout, {"partition": "cohort"}, heldout=["c9"])
    with pytest.raises(SiteError, match=r"partition 'hospital'"):
        build_sites(layout, {"partition": "hospital"})
    with pytest.raises(SiteError, match=r"role 'test'"):
        Site("s", "c0", "test", ("a",))
    with pytest.raises(SiteError, match="mapping.path"):
        build_sites(layout, {"partition": "mapping"})


def test_validation_split_holds_back_a_stratified_share_of_training_sites_only(layout: DatasetLayout) -> None:
    fed = {"partition": "cohort", "val_fraction": 0.25, "val_seed": 3}
    train, held = build_sites(layout, fed, heldout=["c1"])
    assert held.test_ids == () and len(held.case_ids) == 40  # a held-out site evaluates on every case
    censored = load_cohort(layout, "c0").labels["censorship"]
    assert sorted(train.all_ids) == sorted(censored.index) and not set(train.case_ids) & set(train.test_ids)
    for stratum in (censored == 0, censored != 0):  # a quarter of the events and a quarter of the censored
        members = set(censored.index[stratum])
        assert len(members & set(train.test_ids)) == round(0.25 * len(members))
    again, _ = build_sites(layout, fed, heldout=["c1"])
    other, _ = build_sites(layout, {**fed, "val_seed": 4}, heldout=["c1"])
    assert again.test_ids == train.test_ids  # the same split in every process
    assert other.test_ids != train.test_ids


@pytest.mark.parametrize(
    ("fed", "expected"),
    [
        ({"val_fraction": 1.5}, r"federation.val_fraction=1.5: choose a share in \(0, 1\)"),
        ({"val_fraction": 0.2, "split_column": "split"}, "with split_column='split'"),
        ({"val_fraction": 0.01}, r"site 'c0': val_fraction=0.01 of its 20 case\(s\) leaves no validation"),
    ],
)
def test_validation_split_errors_name_the_key_or_site(layout: DatasetLayout, fed: dict, expected: str):
    with pytest.raises(SiteError, match=expected):
        build_sites(layout, {"partition": "cohort", **fed}, heldout=["c1"])


def test_a_deployed_training_site_draws_the_same_validation_split(layout: DatasetLayout) -> None:
    from fedprog.federated.client_app import _resolve

    fed = {"partition": "cohort", "val_fraction": 0.25, "val_seed": 3}
    simulated, _ = build_sites(layout, fed, heldout=["c1"])
    node = {"site": "c0", "cohort": "c0", "role": "train"}  # deployment: the node config names the site
    deployed, _ = _resolve(layout, node, fed, None, ("k",))
    assert (deployed.case_ids, deployed.test_ids) == (simulated.case_ids, simulated.test_ids)
    held, _ = _resolve(layout, {**node, "role": "holdout"}, fed, None, ("k",))
    assert held.test_ids == () and len(held.case_ids) == 20
