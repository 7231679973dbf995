"""Tests of fedprog.data.synth: format, determinism, the premise it carries, ensure_generated and the CLI."""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import ttest_ind
from sksurv.metrics import concordance_index_censored

from fedprog.cli import main as cli_main
from fedprog.config import compose_config
from fedprog.data.synth import (
    SynthError,
    SynthParams,
    ensure_generated,
    generate,
    read_truth,
    site_ceilings,
    stored_params,
)

GENERATION_BUDGET_S = 10.0
CANCERS = ["c0", "c1", "c2", "c3", "c4", "c5"]
SMALL_PATIENTS = [24, 20, 22, 18, 20, 22]
SMALL = [
    f"data.synth.n_patients=[{','.join(map(str, SMALL_PATIENTS))}]",
    "data.synth.patches=[8,16]",
    "data.synth.n_genes=40",
    "data.synth.n_pathways=5",
]


def _data_cfg(overrides: list[str] = ()) -> dict:
    cfg = compose_config("synth", list(overrides))  # unchecked: SynthParams validates its own keys here
    return OmegaConf.to_container(cfg.data, resolve=True)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _cases(root: Path, cohort: str) -> pd.DataFrame:
    return pd.read_csv(root / cohort / "labels.csv").drop_duplicates("case_id").set_index("case_id")


def _bag_means(root: Path, cohort: str) -> pd.DataFrame:
    """Mean patch feature of every case (all its slides), rows in case order."""
    labels = pd.read_csv(root / cohort / "labels.csv")
    rows = {}
    for case_id, slides in labels.groupby("case_id", sort=True):
        bags = [torch.load(root / cohort / "features" / f"{slide}.pt") for slide in slides["slide_id"]]
        rows[case_id] = torch.cat(bags).mean(0).numpy()
    return pd.DataFrame.from_dict(rows, orient="index")


def _rna(root: Path, cohort: str) -> pd.DataFrame:
    return pd.read_csv(root / cohort / "rna.csv.gz").set_index("case_id").sort_index()


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The default dataset, generated once, and the seconds it took."""
    data = _data_cfg()
    out = tmp_path_factory.mktemp("synth") / "default"
    start = time.perf_counter()
    generate(data["synth"], out)
    return out, time.perf_counter() - start


# -------------------------------------------------------------------------------- format


def test_default_generates_within_budget(default: tuple[Path, float]) -> None:
    assert default[1] < GENERATION_BUDGET_S


def test_manifest_has_layout_keys_and_parameters(default: tuple[Path, float]) -> None:
    root, _ = default
    manifest = OmegaConf.to_container(OmegaConf.load(root / "fedprog.yaml"))
    assert manifest["cohorts"] == CANCERS
    assert manifest["tables"] == {"rna": {"path": "rna.csv.gz"}}
    assert (manifest["expression"], manifest["strong"], manifest["features"]) == ("rna", "wsi", "features")
    assert manifest["groups"]["kind"] == "compositions" and manifest["site_column"] == "site"
    assert manifest["truth"] == "truth.csv" and manifest["synth"]["seed"] == 0
    assert stored_params(root) == manifest["synth"]


def test_labels_case_ids_sites_and_slides(default: tuple[Path, float]) -> None:
    root, _ = default
    for k, cohort in enumerate(CANCERS):
        labels = pd.read_csv(root / cohort / "labels.csv")
        assert list(labels.columns) == ["case_id", "survival_months", "censorship", "slide_id", "site"]
        assert (labels["case_id"].str[5:7] == labels["site"]).all()  # TCGA-like: characters 6-7 = site
        assert set(labels["site"]) == {f"{'ABCDEF'[k]}1", f"{'ABCDEF'[k]}2"}
        sizes = labels.drop_duplicates("case_id")["site"].value_counts()
        assert sizes.iloc[0] > sizes.iloc[1]  # unequal hospitals
        assert (labels["survival_months"] > 0).all() and set(labels["censorship"]) == {0, 1}
        slides = labels.groupby("case_id").size()
        assert slides.max() == 2 and (slides == 2).sum() > 0
        assert labels["slide_id"].is_unique
        files = {path.stem for path in (root / cohort / "features").glob("*.pt")}
        assert files == set(labels["slide_id"])


def test_bags_are_float32_with_variable_patch_counts(default: tuple[Path, float]) -> None:
    root, _ = default
    counts = []
    for path in sorted((root / "c1" / "features").glob("*.pt")):
        bag = torch.load(path)
        assert bag.dtype == torch.float32 and bag.ndim == 2 and bag.shape[1] == 64
        assert bag.untyped_storage().nbytes() == bag.numel() * 4  # no hidden storage
        counts.append(bag.shape[0])
    assert 16 <= min(counts) < max(counts) <= 128


def test_expression_and_pathways_share_genes(default: tuple[Path, float]) -> None:
    root, _ = default
    groups = pd.read_csv(root / "groups" / "pathways.csv")
    assert groups.columns[0] == "gene" and groups.shape == (240, 21)
    membership = groups.set_index("gene")
    assert set(np.unique(membership.to_numpy())) == {0, 1} and (membership.sum(axis=1) >= 1).all()
    for cohort in ["c0", "c3"]:
        rna = _rna(root, cohort)
        assert list(rna.columns) == list(groups["gene"])
        assert list(rna.index) == sorted(_cases(root, cohort).index)
        assert np.isfinite(rna.to_numpy()).all()


def test_truth_covers_every_case(default: tuple[Path, float]) -> None:
    root, _ = default
    truth = pd.read_csv(root / "truth.csv")
    assert list(truth.columns[:3]) == ["cohort", "case_id", "true_risk"]
    np.testing.assert_allclose(truth["true_risk"], truth["shared_risk"] + truth["specific_risk"], atol=1e-5)
    for cohort in CANCERS:
        assert set(truth.loc[truth["cohort"] == cohort, "case_id"]) == set(_cases(root, cohort).index)
        cases = _cases(root, cohort)
        sites = truth[truth["cohort"] == cohort].set_index("case_id")["site"]
        assert (sites.loc[cases.index] == cases["site"]).all()


# -------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files(default: tuple[Path, float], tmp_path: Path) -> None:
    root, _ = default
    again = generate(_data_cfg()["synth"], tmp_path / "again")
    assert _hashes(again) == _hashes(root)


def test_other_seed_gives_other_files(default: tuple[Path, float], tmp_path: Path) -> None:
    root, _ = default
    other = _hashes(generate(_data_cfg(["data.synth.seed=1"])["synth"], tmp_path / "other"))
    reference = _hashes(root)
    for name in ["truth.csv", "groups/pathways.csv", "c0/labels.csv", "c0/rna.csv.gz"]:
        assert other[name] != reference[name], name


# -------------------------------------------------------------------------------- premise


def test_censoring_rate_of_each_cancer_in_range(default: tuple[Path, float]) -> None:
    root, _ = default
    for cohort in CANCERS:
        assert 0.3 <= _cases(root, cohort)["censorship"].mean() <= 0.65, cohort


def test_oracle_cindex_is_high(default: tuple[Path, float]) -> None:
    root, _ = default
    truth = pd.read_csv(root / "truth.csv").set_index("case_id")
    for cohort in CANCERS:
        cases = _cases(root, cohort)
        event = cases["censorship"].to_numpy() == 0
        cindex = concordance_index_censored(
            event, cases["survival_months"], truth.loc[cases.index, "true_risk"]
        )[0]
        assert cindex > 0.7, cohort


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_censoring_and_oracle_hold_for_other_seeds(seed: int, tmp_path: Path) -> None:
    root = generate(_data_cfg([f"data.synth.seed={seed}"])["synth"], tmp_path / "ds")
    test_censoring_rate_of_each_cancer_in_range((root, 0.0))
    test_oracle_cindex_is_high((root, 0.0))


def test_wsi_style_shifts_across_cancers_and_sites(default: tuple[Path, float]) -> None:
    root, _ = default
    cancer_means, site_gaps, half_gaps = [], [], []
    for cohort in CANCERS:
        means, sites = _bag_means(root, cohort), _cases(root, cohort).sort_index()["site"]
        cancer_means.append(means.mean().to_numpy())
        first, second = sorted(sites.unique())
        site_gaps.append(np.abs(means[sites == first].mean() - means[sites == second].mean()).mean())
        members = means[sites == first]
        half = len(members) // 2
        half_gaps.append(np.abs(members.iloc[:half].mean() - members.iloc[half:].mean()).mean())
    across_cancers = np.abs(cancer_means[0] - cancer_means[1]).mean()
    assert across_cancers > 1.5 * np.mean(site_gaps)  # cancer style, larger than the site style ...
    assert np.mean(site_gaps) > 1.5 * np.mean(half_gaps)  # ... which is itself more than sampling noise


def test_wsi_style_vanishes_without_style_parameters(tmp_path: Path) -> None:
    style = ["cancer_mean_shift", "cancer_log_scale", "site_mean_shift", "site_log_scale"]
    style += ["specific_strength", "specific_log_scale"]
    overrides = [*SMALL, *(f"data.synth.wsi.{key}=0" for key in style)]
    root = generate(_data_cfg(overrides)["synth"], tmp_path / "noshift")
    gap = np.abs(_bag_means(root, "c0").mean() - _bag_means(root, "c1").mean()).mean()
    shifted = generate(_data_cfg(SMALL)["synth"], tmp_path / "shift")
    assert gap < 0.5 * np.abs(_bag_means(shifted, "c0").mean() - _bag_means(shifted, "c1").mean()).mean()


@pytest.mark.parametrize("cohort", CANCERS)
def test_expression_batch_effect_across_sites(default: tuple[Path, float], cohort: str) -> None:
    """Many genes differ between the two hospitals of a cancer, few between two halves of one hospital."""
    root, _ = default
    rna, sites = _rna(root, cohort), _cases(root, cohort).sort_index()["site"]
    first, second = sorted(sites.unique())
    between_sites = ttest_ind(rna[sites == first], rna[sites == second], equal_var=False).pvalue
    members = rna[sites == first]
    half = len(members) // 2
    within_site = ttest_ind(members.iloc[:half], members.iloc[half:], equal_var=False).pvalue
    assert (between_sites < 0.01).mean() > 0.25 and (within_site < 0.01).mean() < 0.1


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float = 0.05):
    mean, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / sd
    weights = np.linalg.solve(z.T @ z + penalty * len(y) * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda new: ((new - mean) / sd) @ weights


def _style_free(bag: np.ndarray) -> np.ndarray:
    """Mean of the informative patches after standardizing each channel across the bag (style removed).

    Informative patches are the minority cluster along the first principal axis of the standardized bag.
    """
    standardized = (bag - bag.mean(0)) / (bag.std(0) + 1e-6)
    axis = np.linalg.svd(standardized, full_matrices=False)[2][0]
    projection = standardized @ axis
    if np.mean((projection - projection.mean()) ** 3) < 0:
        projection = -projection
    return standardized[projection > 0].mean(0)


def _wsi_features(root: Path, cohort: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw bag channel means and sds, style-free features) per case, rows in case order."""
    labels = pd.read_csv(root / cohort / "labels.csv")
    raw, free = [], []
    for _, slides in labels.groupby("case_id", sort=True):
        bag = torch.cat([torch.load(root / cohort / "features" / f"{s}.pt") for s in slides["slide_id"]])
        bag = bag.numpy().astype(float)
        raw.append(np.concatenate([bag.mean(0), bag.std(0)]))
        free.append(_style_free(bag))
    return np.array(raw), np.array(free)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_wsi_hides_the_shared_factors_behind_style(default: tuple[Path, float]) -> None:
    """Raw WSI statistics carry the cancer-specific factors; the style-free content, the shared ones."""
    root, _ = default
    truth = read_truth(root)
    features = {c: _wsi_features(root, c) for c in CANCERS}
    rows = {c: truth.loc[sorted(_cases(root, c).index)] for c in CANCERS}
    specific_raw, specific_free, transfer = [], [], []
    for cohort in CANCERS:
        raw, free = features[cohort]
        specific, half = rows[cohort]["specific_risk"].to_numpy(), len(raw) // 2
        specific_raw.append(_corr(_ridge(raw[:half], specific[:half])(raw[half:]), specific[half:]))
        specific_free.append(_corr(_ridge(free[:half], specific[:half])(free[half:]), specific[half:]))
        sources = [c for c in CANCERS if c != cohort]
        model = _ridge(
            np.vstack([features[c][1] for c in sources]),
            np.concatenate([rows[c]["shared_risk"] for c in sources]),
        )
        target = rows[cohort]
        transfer.append(
            concordance_index_censored(target["censorship"] == 0, target["survival_months"], model(free))[0]
        )
    assert np.mean(specific_raw) > 0.7  # in-domain, raw WSI reads the cancer-specific factors ...
    assert abs(np.mean(specific_free)) < 0.2  # ... which standardizing each channel across the bag removes,
    assert np.mean(transfer) > 0.6  # while the shared factors survive and transfer to unseen cancers


def test_expression_transfers_but_not_to_the_ceiling(default: tuple[Path, float]) -> None:
    """Expression read-outs fitted on other cancers transfer, below the transfer ceiling (cancer effects)."""
    root, _ = default
    truth = read_truth(root)
    rna = {c: _rna(root, c) for c in CANCERS}
    scores, ceilings = [], site_ceilings(root).query("site == 'all'").set_index("cohort")
    for cohort in CANCERS:
        sources = [c for c in CANCERS if c != cohort]
        model = _ridge(
            np.vstack([rna[c].to_numpy() for c in sources]),
            np.concatenate([truth.loc[rna[c].index, "true_risk"] for c in sources]),
        )
        target = truth.loc[rna[cohort].index]
        risk = model(rna[cohort].to_numpy())
        scores.append(
            concordance_index_censored(target["censorship"] == 0, target["survival_months"], risk)[0]
        )
    assert 0.55 < np.mean(scores) < ceilings["transfer_c_index"].mean() - 0.02


def test_shared_risk_is_the_same_function_in_every_cancer(default: tuple[Path, float]) -> None:
    root, _ = default
    truth = pd.read_csv(root / "truth.csv")
    z = [c for c in truth.columns if c.startswith("z")]
    u = [c for c in truth.columns if c.startswith("u")]
    betas, gammas = [], []
    for _, rows in truth.groupby("cohort"):
        beta, residual = np.linalg.lstsq(rows[z].to_numpy(), rows["shared_risk"].to_numpy(), rcond=None)[:2]
        betas.append(beta)
        assert residual.sum() < 1e-6  # exactly linear in the shared factors
        gammas.append(np.linalg.lstsq(rows[u].to_numpy(), rows["specific_risk"].to_numpy(), rcond=None)[0])
    np.testing.assert_allclose(betas, np.repeat(betas[:1], len(betas), axis=0), atol=1e-4)
    gammas = np.array(gammas)
    np.testing.assert_allclose(np.linalg.norm(gammas, axis=1), 0.8, atol=1e-3)  # risk.specific_effect
    assert np.linalg.norm(gammas.sum(0)) > 0.2  # random directions, not evenly spaced (those sum to 0)
    for k in range(len(gammas)):  # the other cancers' mean direction is no mirror image of the held-out one
        others = np.delete(gammas, k, axis=0).mean(0)
        cosine = others @ gammas[k] / (np.linalg.norm(others) * np.linalg.norm(gammas[k]))
        assert cosine > -0.99


def test_ceilings_are_computed_from_truth(default: tuple[Path, float]) -> None:
    root, _ = default
    ceilings = site_ceilings(root).set_index("site")
    truth = pd.read_csv(root / "truth.csv").set_index("case_id")
    for cohort in CANCERS:
        cases = _cases(root, cohort)
        for site, members in [*cases.groupby("site"), ("all", cases)]:
            name = site if site == "all" else f"{cohort}-{site}"
            row = ceilings[ceilings["cohort"] == cohort].loc[name]
            event = members["censorship"] == 0
            for column, ceiling in [("true_risk", "oracle_c_index"), ("shared_risk", "transfer_c_index")]:
                expected = concordance_index_censored(
                    event, members["survival_months"], truth.loc[members.index, column]
                )[0]
                assert row[ceiling] == pytest.approx(expected, abs=1e-9)
            assert (row["n"], row["n_events"]) == (len(members), int(event.sum()))
    whole = ceilings.loc["all"]
    assert (whole["oracle_c_index"] > whole["transfer_c_index"]).all()
    assert (whole["n_events"] >= 60).all()  # enough events per held-out cancer for the rotation


# -------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.synth.n_patients=[10,10]"], r"data\.synth\.n_patients: expected 6 values"),
        (["data.synth.case_prefix=TCGA1"], r"data\.synth\.case_prefix: expected 4 characters"),
        (["data.synth.survival.censoring=[0.5,0.5,1.2,0.5,0.5,0.5]"], r"censoring: cancer c2"),
        (["data.synth.patches=[64,32]"], r"data\.synth\.patches: expected \[min, max\] in \[1, inf\]"),
        (["data.synth.feature_dim=1.5"], r"data\.synth\.feature_dim: expected int"),
        (["+data.synth.wsi.typo=1"], r"data\.synth\.wsi: unknown keys \['typo'\]"),
        (["~data.synth.seed"], r"data\.synth: unknown keys \[\], missing keys \['seed'\]"),
    ],
)
def test_invalid_parameters_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(SynthError, match=match):
        SynthParams.from_config(_data_cfg(overrides)["synth"])


def test_unreachable_censoring_target_names_the_cancer(tmp_path: Path) -> None:
    synth = _data_cfg([*SMALL, "data.synth.survival.max_followup=1.0"])["synth"]
    with pytest.raises(SynthError, match=r"cancer c0: .* exceed max_followup"):
        generate(synth, tmp_path / "x")
    assert not any(tmp_path.iterdir())  # the staging folder is cleaned up


def test_generate_refuses_to_overwrite_other_data(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SynthError, match=r"mine: exists and is not a generated dataset"):
        generate(_data_cfg(SMALL)["synth"], tmp_path / "mine")
    (tmp_path / "mine" / "fedprog.yaml").write_text("name: real\ncohorts: [brca]\n")
    with pytest.raises(SynthError, match=r"fedprog\.yaml: no 'synth' section.*add data=folder"):
        generate(_data_cfg(SMALL)["synth"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# -------------------------------------------------------------------------------- ensure_generated


def test_ensure_generated_creates_reuses_and_regenerates(tmp_path: Path) -> None:
    data = _data_cfg([*SMALL, f"data.root={tmp_path / 'ds'}"])
    root = ensure_generated(data)
    marker = root / "c0" / "marker.txt"
    marker.write_text("unchanged dataset is not rewritten")
    assert ensure_generated(data) == root and marker.exists()
    data["synth"]["seed"] = 7
    ensure_generated(data)
    assert not marker.exists() and stored_params(root)["seed"] == 7
    assert not [p.name for p in tmp_path.iterdir() if p.name != "ds"]  # no staging or retired folders left


def test_ensure_generated_respects_generate_if_missing(tmp_path: Path) -> None:
    data = _data_cfg([*SMALL, f"data.root={tmp_path / 'ds'}", "data.generate_if_missing=false"])
    with pytest.raises(SynthError, match=r"ds: no fedprog\.yaml and data\.generate_if_missing is false"):
        ensure_generated(data)
    generate(data["synth"], tmp_path / "ds")
    assert ensure_generated(data) == tmp_path / "ds"
    data["synth"]["seed"] = 3
    with pytest.raises(SynthError, match=r"stored parameters differ in \['seed'\]"):
        ensure_generated(data)


def test_data_config_cohorts_follow_cancers() -> None:
    data = _data_cfg(["data.synth.cancers=[brca,blca]"])
    assert data["cohorts"] == ["brca", "blca"]


# -------------------------------------------------------------------------------- CLI


def test_cli_writes_and_summarizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["synth", f"out={out}", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"dataset written to {out}" in printed and "c5" in printed
    assert "transfer_c_index" in printed and "c5-F2" in printed
    assert (out / "fedprog.yaml").is_file() and len(_cases(out, "c3")) == 18


# -------------------------------------------------------------------------------- round trip


def test_round_trip_through_the_data_package(tmp_path: Path) -> None:
    """synth -> check_dataset -> load_cohort -> SurvivalDataset[0] with fedprog.data's loader."""
    fd = pytest.importorskip("fedprog.data", reason="fedprog.data loader not importable")
    if not all(hasattr(fd, name) for name in ["check_dataset", "load_cohort", "SurvivalDataset"]):
        pytest.skip("fedprog.data does not export its loader yet")
    root = generate(_data_cfg(SMALL)["synth"], tmp_path / "ds")
    layout = fd.DatasetLayout.load(root)
    summary = fd.check_dataset(layout).to_frame()
    for cohort, patients in zip(CANCERS, SMALL_PATIENTS, strict=True):
        row = summary.loc[cohort]
        assert (row["cases"], row["dropped"], row["sites"], row["feature_dim"]) == (patients, 0, 2, 64)
        assert (row["genes"], row["groups"]) == (40, 5)
        assert row["bags"] == len(pd.read_csv(root / cohort / "labels.csv"))
        assert row["censoring_rate"] == pytest.approx(_cases(root, cohort)["censorship"].mean())
    cohort = fd.load_cohort(layout, "c0")
    assert (cohort.labels.index.str[5:7] == cohort.labels["site"].astype(str)).all()
    assert cohort.dropped.empty and max(len(paths) for paths in cohort.bag_paths.values()) == 2
    bins = fd.SurvivalBins.fit(cohort.labels["survival_months"], cohort.labels["censorship"], n_bins=4)
    dataset = fd.SurvivalDataset(
        cohort,
        list(cohort.labels.index),
        expression_transform=fd.ExpressionTransform().fit(cohort.tables["rna"]),
        strong_transform=None,
        bins=bins,
        groups=fd.load_groups(layout),
    )
    batch = fd.collate([dataset[0], dataset[1]])
    assert batch.expression.shape == (2, 40) and batch.strong.shape[-1] == 64
    assert batch.strong_mask.dtype == torch.bool and batch.bins.dtype == torch.long
    first = cohort.bag_paths[batch.case_ids[0]]
    assert int(batch.strong_mask[0].sum()) == sum(torch.load(path).shape[0] for path in first)


def test_concurrent_first_use_yields_one_complete_dataset(tmp_path: Path) -> None:
    """Several processes (simulated sites) calling ensure_generated at once all get the same dataset."""
    data = _data_cfg([*SMALL, f"data.root={tmp_path / 'ds'}"])
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        roots = list(pool.map(ensure_generated, [data] * 3))
    assert {str(root) for root in roots} == {str(tmp_path / "ds")}
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    reference = generate(data["synth"], tmp_path / "reference")
    assert _hashes(tmp_path / "ds") == _hashes(reference)
