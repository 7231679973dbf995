"""Label-free per-site standardization of WSI patch features (``data.site_standardize``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from data_factory import write_cohort
from fed_helpers import DirectGrid, tiny_config

from fedprog.config import load_config
from fedprog.data import DatasetLayout, LayoutError, build_sites, load_cohort
from fedprog.data.bags import read_case_bags
from fedprog.data.cohort import SITE
from fedprog.data.site_norm import channel_stats, standardize_bag
from fedprog.federated import client_app
from fedprog.federated.messages import config_record
from fedprog.federated.simulation import prepare
from fedprog.pipeline import fit_preprocessing, make_dataset

TOL = 1e-4


def _layout(root: Path, **keys) -> DatasetLayout:
    layout = write_cohort(root, "c0", n_cases=24)
    write_cohort(root, "c1", n_cases=16, seed=1)
    path = layout.root / "fedprog.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest.update(keys)
    path.write_text(yaml.safe_dump(manifest))
    return DatasetLayout.load(layout.root)


def _bags(layout: DatasetLayout, cohort: str, site_cases=None) -> dict[str, torch.Tensor]:
    """Case -> evaluation bag of ``cohort`` (preprocessing fitted on c0)."""
    cohorts = {name: load_cohort(layout, name) for name in layout.cohorts}
    prep = fit_preprocessing(layout, cohorts, {"c0": list(cohorts["c0"].labels.index)}, n_bins=2)
    ids = list(cohorts[cohort].labels.index) if site_cases is None else list(site_cases)
    data = make_dataset(cohorts[cohort], ids, prep, site_cases=site_cases).eval()
    return {case: data[i].strong for i, case in enumerate(data.case_ids)}


def _pooled_by_site(
    layout: DatasetLayout, cohort: str, bags: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    sites = load_cohort(layout, cohort).labels[SITE].astype(str)
    out: dict[str, list[torch.Tensor]] = {}
    for case, bag in bags.items():
        out.setdefault(sites.loc[case], []).append(bag)
    return {site: torch.cat(parts) for site, parts in out.items()}


def test_off_by_default_leaves_bags_bit_identical(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds")
    assert layout.site_standardize is False
    assert load_config("train", ["data=synth"]).data.site_standardize is False
    cohort = load_cohort(layout, "c0")
    for case, bag in _bags(layout, "c0").items():
        raw = read_case_bags(cohort.bag_paths[case], case_id=case, cohort="c0")
        assert torch.equal(bag, raw)


def test_each_site_pooled_patches_have_zero_mean_unit_std(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds", site_standardize=True)
    pooled = _pooled_by_site(layout, "c0", _bags(layout, "c0"))
    assert len(pooled) == 3  # sites A1, B2, C3, each standardized by its own statistics
    for patches in pooled.values():
        assert patches.mean(0).abs().max() < TOL
        assert (patches.std(0, unbiased=False) - 1.0).abs().max() < TOL
    raw = _bags(_layout(tmp_path / "raw"), "c0")
    assert (_pooled_by_site(layout, "c0", raw)["A1"].mean(0).abs().max()) > 0.05  # it did something


def test_statistics_use_no_labels(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds", site_standardize=True)
    before = _bags(layout, "c1")
    path = layout.cohort_file("c1", "labels.csv")
    labels = pd.read_csv(path)
    times = labels.drop_duplicates("case_id").set_index("case_id")["survival_months"]
    labels["survival_months"] = labels["case_id"].map(
        dict(zip(times.index, times.to_numpy()[::-1] * 3.0, strict=True))
    )
    labels["censorship"] = 1 - labels["censorship"]
    labels.loc[:4, "censorship"] = 0
    labels.to_csv(path, index=False)
    after = _bags(layout, "c1")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[case], after[case]) for case in before)


def test_heldout_site_uses_its_own_statistics(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds", site_standardize=True)
    sites = build_sites(layout, {"partition": "site"}, ["c1-B2"])
    held = next(s for s in sites if s.role == "holdout")
    bags = _bags(layout, "c1", site_cases=held.all_ids)
    patches = torch.cat(list(bags.values()))
    assert patches.mean(0).abs().max() < TOL
    assert (patches.std(0, unbiased=False) - 1.0).abs().max() < TOL
    cohort = load_cohort(layout, "c1")
    own = channel_stats(cohort, held.all_ids)
    case = held.all_ids[0]
    raw = read_case_bags(cohort.bag_paths[case], case_id=case, cohort="c1")
    torch.testing.assert_close(bags[case], (raw - own.mean) / own.std)


def test_layout_key_is_checked(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds", site_standardize=True)
    assert DatasetLayout.from_dict(layout.to_dict()).site_standardize is True
    with pytest.raises(LayoutError, match="site_standardize must be true or false"):
        DatasetLayout.from_dict({**layout.to_dict(), "site_standardize": "yes"})
    with pytest.raises(LayoutError, match="site_standardize=true standardizes WSI"):
        DatasetLayout.from_dict({**layout.to_dict(), "strong": "clinical", "site_standardize": True})


def test_option_reaches_the_client(tmp_path: Path) -> None:
    """The run config travels in the message's ConfigRecord; the client builds standardized site datasets."""
    root = tmp_path / "synth"
    cfg = prepare(tiny_config(root, tmp_path / "out", "data.site_standardize=true"))
    client_app.clear_caches()
    received = client_app.config_from_record(config_record(cfg))
    assert received.data.site_standardize is True
    grid = DirectGrid(int(cfg.expected_sites))
    for node in grid.node_ids:
        handle = client_app.resolve_site(received, grid.contexts[node])
        layout = handle.layout
        cohorts = {name: load_cohort(layout, name) for name in layout.cohorts}
        prep = fit_preprocessing(layout, cohorts, {"c0": list(cohorts["c0"].labels.index)}, n_bins=2)
        _, eval_ds = client_app.site_datasets(received, handle, json.dumps(prep.state_dict()))
        assert eval_ds.standardizers is not None
        patches = torch.cat([eval_ds.eval()[i].strong for i in range(len(eval_ds))])
        assert patches.mean(0).abs().max() < TOL, handle.site.name
        assert (patches.std(0, unbiased=False) - 1.0).abs().max() < TOL, handle.site.name
    client_app.clear_caches()


def test_pooled_baseline_runs_standardized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """strategy=pooled builds every site's dataset (held-out included) through the same standardization."""
    from fedprog import baselines
    from fedprog.federated import simulation

    cfg = tiny_config(tmp_path / "synth", tmp_path / "out", "strategy=pooled", "data.site_standardize=true")
    seen: list[bool] = []
    original = baselines.make_dataset

    def spy(*args, **kwargs):
        data = original(*args, **kwargs)
        seen.append(data.standardizers is not None and kwargs["site_cases"] is not None)
        return data

    monkeypatch.setattr(baselines, "make_dataset", spy)
    assert simulation.main(cfg) == 0
    assert seen and all(seen)


# ------------------------------------------------------------------------- per bag (data.bag_standardize)
def test_bag_standardization_removes_any_per_channel_style_and_keeps_the_content(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds", bag_standardize=True)
    bags = _bags(layout, "c1")
    cohort = load_cohort(layout, "c1")
    for case, bag in bags.items():
        assert bag.mean(0).abs().max() < TOL  # every channel centred and scaled over the bag's own patches
        assert (bag.std(0, unbiased=False) - 1.0).abs().max() < 1e-3
        raw = read_case_bags(cohort.bag_paths[case], case_id=case, cohort="c1")
        generator = torch.Generator().manual_seed(len(case))
        shift, scale = torch.randn(raw.shape[1], generator=generator), torch.rand(raw.shape[1]) + 0.2
        torch.testing.assert_close(standardize_bag(raw * scale + shift), bag, atol=1e-4, rtol=1e-4)
        # the content: each patch's position relative to the bag's others is unchanged
        torch.testing.assert_close(torch.corrcoef(bag.T), torch.corrcoef(raw.T), atol=1e-4, rtol=1e-4)
    constant = torch.ones(5, 3)
    assert torch.equal(standardize_bag(constant), torch.zeros(5, 3))


def test_bag_standardization_is_applied_before_patch_sampling(tmp_path: Path) -> None:
    """Training samples patches of the bag standardized as a whole: the same transform as evaluation."""
    layout = _layout(tmp_path / "ds", bag_standardize=True)
    cohorts = {name: load_cohort(layout, name) for name in layout.cohorts}
    prep = fit_preprocessing(layout, cohorts, {"c0": list(cohorts["c0"].labels.index)}, n_bins=2)
    ids = list(cohorts["c0"].labels.index)
    whole = make_dataset(cohorts["c0"], ids, prep).eval()
    sampled = make_dataset(cohorts["c0"], ids, prep, max_patches=2).train()
    for i in range(len(ids)):
        full, part = whole[i].strong, sampled[i].strong
        assert part.shape[0] == min(2, full.shape[0])
        assert all(any(torch.allclose(row, other) for other in full) for row in part)


def test_bag_standardize_key_is_checked(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "ds", bag_standardize=True)
    assert DatasetLayout.from_dict(layout.to_dict()).bag_standardize is True
    assert load_config("train", ["data=synth"]).data.bag_standardize is False
    with pytest.raises(LayoutError, match="bag_standardize must be true or false"):
        DatasetLayout.from_dict({**layout.to_dict(), "bag_standardize": "yes"})
    with pytest.raises(LayoutError, match="bag_standardize=true standardizes WSI"):
        DatasetLayout.from_dict({**layout.to_dict(), "strong": "clinical", "bag_standardize": True})
    with pytest.raises(LayoutError, match="site_standardize and bag_standardize are both true; choose one"):
        DatasetLayout.from_dict({**layout.to_dict(), "site_standardize": True})
