"""SurvivalDataset, Sample, collate and Batch: shapes, patch sampling, masks, strata, no refit on held-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from data_factory import write_cohort

from fedprog.data import (
    BagError,
    CohortError,
    DatasetLayout,
    ExpressionTransform,
    GeneMismatchError,
    SurvivalBins,
    SurvivalDataset,
    build_sites,
    collate,
    expression_frame,
    load_cohorts,
    load_groups,
    tabular_transform_for,
)


@pytest.fixture
def layout(tmp_path: Path) -> DatasetLayout:
    write_cohort(tmp_path / "ds", "c0", n_cases=24, seed=0)
    return write_cohort(tmp_path / "ds", "c1", n_cases=16, seed=1)


def _fit(layout: DatasetLayout):
    cohorts = load_cohorts(layout)
    sites = build_sites(layout, {"partition": "cohort"}, heldout=["c1"], cohorts=cohorts)
    train = [s for s in sites if s.role == "train"]
    groups = load_groups(layout).restrict(cohorts["c0"].genes)
    frame = pd.concat([expression_frame(cohorts[s.cohort], groups, s.case_ids) for s in train])
    transform = ExpressionTransform().fit(frame)
    labels = pd.concat([cohorts[s.cohort].labels.loc[list(s.case_ids)] for s in train])
    bins = SurvivalBins.fit(labels["survival_months"], labels["censorship"])
    return cohorts, sites, groups, transform, bins


def test_sample_and_batch(layout: DatasetLayout) -> None:
    cohorts, sites, groups, transform, bins = _fit(layout)
    ds = SurvivalDataset(
        cohorts["c0"],
        sites[0].case_ids,
        expression_transform=transform,
        strong_transform=None,
        bins=bins,
        groups=groups,
    )
    assert len(ds) == 24 and ds.genes == groups.gene_order
    sample = ds[3]  # the 4th case has two slides: bags concatenated
    paths = cohorts["c0"].bag_paths[sample.case_id]
    assert len(paths) == 2
    n = sum(torch.load(p).shape[0] for p in paths)
    assert sample.strong.shape == (n, 8) and sample.expression.shape == (12,)
    assert sample.expression.dtype == torch.float32
    batch = collate([ds[i] for i in range(5)])
    assert batch.strong.shape[0] == 5 and batch.strong.shape[2] == 8
    lengths = [ds[i].strong.shape[0] for i in range(5)]
    assert batch.strong_mask.sum(1).tolist() == lengths
    assert batch.strong[~batch.strong_mask].abs().sum() == 0
    assert batch.bins.dtype == torch.long and batch.censorship.dtype == torch.float32
    assert batch.case_ids == ds.case_ids[:5]
    assert batch.to("cpu").expression.shape == (5, 12)
    assert ds.strata().tolist() == (ds.bin_labels * 2 + ds.censorship.astype(int)).tolist()
    assert ds.n_events == int((ds.censorship == 0).sum()) and ds.strong_dim == 8
    assert ds.group_index == groups.indices(groups.gene_order)


def test_patch_sampling_is_seeded_and_only_in_training(layout: DatasetLayout) -> None:
    cohorts, sites, groups, transform, bins = _fit(layout)
    kwargs = dict(
        expression_transform=transform, strong_transform=None, bins=bins, groups=groups, max_patches=3
    )
    ds = SurvivalDataset(cohorts["c0"], sites[0].case_ids, **kwargs, seed=7)
    full = ds[3].strong
    assert full.shape[0] > 3  # eval: all patches
    ds.train()
    a = ds[3].strong
    assert a.shape == (3, 8)
    rows = [int(torch.nonzero((full == r).all(1))[0]) for r in a]
    assert rows == sorted(rows) and len(set(rows)) == 3  # a subset without replacement, in order
    assert torch.equal(
        SurvivalDataset(cohorts["c0"], sites[0].case_ids, **kwargs, seed=7).train()[3].strong, a
    )
    epoch0 = [ds[i].strong for i in range(len(ds))]
    ds.set_epoch(1)
    assert any(not torch.equal(x, ds[i].strong) for i, x in enumerate(epoch0))  # a new draw per epoch
    ds.set_epoch(0)
    assert torch.equal(ds[3].strong, a)


def test_heldout_site_never_refits(layout: DatasetLayout) -> None:
    cohorts, sites, groups, transform, bins = _fit(layout)
    t_state, b_state = transform.state_dict(), bins.to_dict()
    held = sites[1]
    assert held.role == "holdout"
    ds = SurvivalDataset(
        cohorts["c1"],
        held.case_ids,
        expression_transform=transform,
        strong_transform=None,
        bins=bins,
        groups=groups,
    )
    assert transform.state_dict() == t_state and bins.to_dict() == b_state
    raw = expression_frame(cohorts["c1"], groups).to_numpy()
    mean, std = np.asarray(t_state["mean"]), np.asarray(t_state["std"])
    expected = np.clip((raw - mean) / std, -5, 5)
    np.testing.assert_allclose(
        torch.stack([ds[i].expression for i in range(len(ds))]).numpy(), expected, rtol=1e-5
    )
    assert ds.bin_labels.tolist() == bins.transform(cohorts["c1"].labels["survival_months"]).tolist()


def test_dataset_errors(layout: DatasetLayout) -> None:
    cohorts, sites, groups, transform, bins = _fit(layout)
    kwargs = dict(expression_transform=transform, strong_transform=None, bins=bins, groups=groups)
    with pytest.raises(CohortError, match=r"cohort 'c0': case\(s\) nope not loaded"):
        SurvivalDataset(cohorts["c0"], ["nope"], **kwargs)
    narrow = ExpressionTransform().fit(expression_frame(cohorts["c0"]).drop(columns=["G001"]))
    with pytest.raises(GeneMismatchError, match=r"cohort 'c1'.*not fitted on gene\(s\) G001"):
        SurvivalDataset(cohorts["c1"], cohorts["c1"].case_ids, **{**kwargs, "expression_transform": narrow})
    case = cohorts["c0"].case_ids[0]
    path = cohorts["c0"].bag_paths[case][0]
    ds = SurvivalDataset(cohorts["c0"], cohorts["c0"].case_ids, **kwargs)
    ds[1]
    torch.save(torch.ones(4, 5), path)
    with pytest.raises(BagError, match=rf"{path.name} \(case {case}, cohort c0\): feature dimension 5"):
        ds[0]


def test_tabular_strong_modality(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "tab", with_bags=False)
    cohorts = load_cohorts(layout)
    cohort = cohorts["c0"]
    strong = tabular_transform_for(layout).fit(cohort.tables["clinical"])
    bins = SurvivalBins.fit(cohort.labels["survival_months"], cohort.labels["censorship"])
    ds = SurvivalDataset(
        cohort,
        cohort.case_ids,
        expression_transform=ExpressionTransform(method="rank"),
        strong_transform=strong,
        bins=bins,
        groups=None,
    )
    assert ds[0].strong.shape == (2, 1) and ds.strong_dim == 2
    batch = collate([ds[0], ds[1]])
    assert batch.strong.shape == (2, 2, 1) and batch.strong_mask.all()
    with pytest.raises(CohortError, match="needs a fitted TabularTransform"):
        SurvivalDataset(
            cohort, cohort.case_ids, expression_transform=None, strong_transform=None, bins=bins, groups=None
        )
