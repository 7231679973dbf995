"""Gene harmonization: training sites fix the features; other sites are aligned, imputed or refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_factory import write_cohort

from fedprog.config import load_config
from fedprog.data import DatasetLayout, ExpressionTransform, GeneMismatchError, load_cohorts
from fedprog.data.harmonize import feature_genes, missing_genes
from fedprog.pipeline import fit_preprocessing, make_dataset


def _drop_genes(layout: DatasetLayout, cohort: str, genes: list[str]) -> None:
    path = layout.cohort_file(cohort, "rna.csv.gz")
    pd.read_csv(path).drop(columns=genes).to_csv(path, index=False)


def _folder(root: Path, lacking: dict[str, list[str]], n_genes: int = 20, **keys) -> DatasetLayout:
    for i, cohort in enumerate(("c0", "c1", "c2")):
        layout = write_cohort(root, cohort, n_cases=24, n_genes=n_genes, n_groups=4, seed=i)
    for cohort, genes in lacking.items():
        _drop_genes(layout, cohort, genes)
    return DatasetLayout.load({"root": str(root), **keys}) if keys else layout


def test_feature_genes_policies() -> None:
    lists = {"a": ["G1", "G2", "G3"], "b": ["G3", "G1", "G4"]}
    assert feature_genes(lists, "intersection") == ["G1", "G3"]  # first training site's order
    assert feature_genes(lists, "union") == ["G1", "G2", "G3", "G4"]
    with pytest.raises(GeneMismatchError, match=r"2 shared of 4.*strict"):
        feature_genes(lists, "strict")
    assert feature_genes({"a": ["G1"], "b": ["G1"]}, "strict") == ["G1"]


def test_missing_gene_threshold_names_site_and_count() -> None:
    genes = [f"G{i}" for i in range(10)]
    assert missing_genes("h1", genes[1:], genes, 0.1) == ["G0"]
    with pytest.raises(GeneMismatchError, match=r"site 'h1' lacks 2 of the 10 training genes.*0\.1"):
        missing_genes("h1", genes[2:], genes, 0.1)


def test_heldout_site_lacking_genes_is_imputed_at_training_mean(tmp_path: Path) -> None:
    layout = _folder(tmp_path / "ds", {"c1": ["G002"]}, max_missing_genes_fraction=0.1)
    cohorts = load_cohorts(layout)
    prep = fit_preprocessing(layout, cohorts, {"c0": cohorts["c0"].case_ids}, n_bins=2)
    assert prep.expression is not None and len(prep.expression.genes) == 20  # c0 alone fixes the features
    data = make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep, site="c1-held")
    assert data.missing_genes == ["G002"]
    column = data.genes.index("G002")
    assert np.all(data._expression[:, column] == 0.0)  # the training mean, after standardization
    assert np.any(data._expression[:, column - 1] != 0.0)
    full = make_dataset(cohorts["c2"], cohorts["c2"].case_ids, prep)
    assert full.missing_genes == []


def test_too_many_missing_genes_is_refused_with_one_line(tmp_path: Path) -> None:
    layout = _folder(tmp_path / "ds", {"c1": ["G001", "G002", "G003"]})  # 3/20 = 15% > 10 %
    cohorts = load_cohorts(layout)
    prep = fit_preprocessing(layout, cohorts, {"c0": cohorts["c0"].case_ids}, n_bins=2)
    with pytest.raises(GeneMismatchError, match=r"site 'c1-B2' lacks 3 of the 20 training genes") as info:
        make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep, site="c1-B2")
    assert "\n" not in str(info.value)


def test_features_do_not_depend_on_other_cohorts_in_the_folder(tmp_path: Path) -> None:
    alone = _folder(tmp_path / "a", {})
    crowded = _folder(tmp_path / "b", {"c2": ["G004", "G007"]})  # an extra cohort lacking genes
    for layout in (alone, crowded):
        cohorts = load_cohorts(layout)
        train = {"c0": cohorts["c0"].case_ids, "c1": cohorts["c1"].case_ids}
        prep = fit_preprocessing(layout, cohorts, train, n_bins=2)
        assert prep.expression is not None and len(prep.expression.genes) == 20


def test_union_policy_counts_only_sites_that_measured_a_gene(tmp_path: Path) -> None:
    layout = _folder(tmp_path / "ds", {"c1": ["G002"]}, gene_policy="union", max_missing_genes_fraction=0.1)
    cohorts = load_cohorts(layout)
    train = {"c0": cohorts["c0"].case_ids, "c1": cohorts["c1"].case_ids}
    prep = fit_preprocessing(layout, cohorts, train, n_bins=2)
    assert prep.expression is not None and "G002" in prep.expression.genes
    c0 = cohorts["c0"].tables["rna"]
    reference = ExpressionTransform(**layout.transform).fit(c0[["G002"]])
    position = prep.expression.genes.index("G002")
    assert prep.expression.mean[position] == pytest.approx(reference.mean[0])  # c0's cases only
    intersection = fit_preprocessing(DatasetLayout.load({"root": str(layout.root)}), cohorts, train, n_bins=2)
    assert intersection.expression is not None and "G002" not in intersection.expression.genes


def test_strict_policy_refuses_any_missing_gene(tmp_path: Path) -> None:
    layout = _folder(tmp_path / "ds", {"c1": ["G002"]}, gene_policy="strict")
    cohorts = load_cohorts(layout)
    prep = fit_preprocessing(layout, cohorts, {"c0": cohorts["c0"].case_ids}, n_bins=2)
    with pytest.raises(GeneMismatchError, match=r"lacks 1 of the 20"):
        make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep)


@pytest.mark.parametrize("strategy", ["local", "pooled"])
def test_pooled_and_local_baselines_with_differing_genes(tmp_path: Path, strategy: str) -> None:
    from fedprog.federated import simulation

    layout = _folder(tmp_path / "ds", {"c1": ["G003"], "c2": ["G005"]}, n_genes=24)
    out = tmp_path / strategy
    cfg = load_config(
        "simulate",
        [
            "data=folder",
            f"data.root={layout.root}",
            "data.strong=clinical",
            "data.features=null",
            f"out={out}",
            "heldout=[c2]",
            "federation.partition=cohort",
            f"strategy={strategy}",
            "rounds=1",
            "n_bins=2",
            "model=snn",
            "model.dim=8",
            "training.epochs=1",
        ],
    )
    assert simulation.main(cfg) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert set(rounds["site"]) == {"c0", "c1", "c2"}
    lacking = rounds.groupby("site")["missing_genes"].max().to_dict()
    assert lacking["c2"] == 1 and lacking["c0"] == 0
    results = json.loads((out / "results.json").read_text())
    assert {s["site"]: s["missing_genes"] for s in results["sites"]}["c2"] == 1
    assert np.isfinite(results["headline"]["heldout_c_index"])


def test_federated_heldout_site_lacking_genes_evaluates(tmp_path: Path) -> None:
    from fed_helpers import DirectGrid

    from fedprog.federated import client_app
    from fedprog.federated.server_app import run_federation
    from fedprog.federated.simulation import prepare

    layout = _folder(tmp_path / "ds", {"c2": ["G005"]}, n_genes=24)
    client_app.clear_caches()
    cfg = prepare(
        load_config(
            "simulate",
            [
                "data=folder",
                f"data.root={layout.root}",
                "data.strong=clinical",
                "data.features=null",
                f"out={tmp_path / 'run'}",
                "heldout=[c2]",
                "federation.partition=cohort",
                "rounds=1",
                "n_bins=2",
                "model=snn",
                "model.dim=8",
                "training.epochs=1",
                "node_wait_timeout=5",
            ],
        )
    )
    results = run_federation(DirectGrid(int(cfg.expected_sites)), cfg)
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    held = rounds[rounds["site"] == "c2"]
    assert len(held) == 1 and np.isfinite(held["c_index"]).all()  # imputed, not dropped
    assert held["missing_genes"].tolist() == [1]  # and the site's report says how many genes it lacked
    assert (rounds[rounds["site"] != "c2"]["missing_genes"] == 0).all()
    assert results["status"] == "completed"


@pytest.mark.parametrize(
    ("policy", "words"), [("strict", "strict"), ("union", "a federation needs one of intersection|strict")]
)
def test_federated_fit_follows_the_sites_gene_policy(tmp_path: Path, policy: str, words: str) -> None:
    from fed_helpers import DirectGrid

    from fedprog.federated import client_app
    from fedprog.federated.server_app import run_federation
    from fedprog.federated.simulation import prepare

    layout = _folder(tmp_path / "ds", {"c1": ["G005"]}, n_genes=24)  # a TRAINING site lacks one gene
    client_app.clear_caches()
    cfg = prepare(
        load_config(
            "simulate",
            [
                "data=folder",
                f"data.root={layout.root}",
                f"data.gene_policy={policy}",
                "data.strong=clinical",
                "data.features=null",
                f"out={tmp_path / 'run'}",
                "heldout=[c2]",
                "federation.partition=cohort",
                "rounds=1",
                "model=snn",
                "node_wait_timeout=5",
            ],
        )
    )
    from fedprog.federated.strategy import FederationError

    with pytest.raises(FederationError, match=words.replace("|", r"\|")):
        run_federation(DirectGrid(int(cfg.expected_sites)), cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and words in results["message"]


def test_site_moments_summed_equal_the_pooled_union_fit(tmp_path: Path) -> None:
    from fedprog.pipeline import fit_expression, site_expression_moments

    layout = _folder(tmp_path / "ds", {"c1": ["G002"]}, gene_policy="union", max_missing_genes_fraction=0.1)
    cohorts = load_cohorts(layout)
    parts = {name: (cohorts[name], cohorts[name].case_ids) for name in ("c0", "c1")}
    groups, pooled = fit_expression(layout, parts)
    genes = groups.gene_order if groups is not None else pooled.genes
    moments = [site_expression_moments(layout, c, genes, ids, site=n) for n, (c, ids) in parts.items()]
    assert moments[1]["gene_count"][genes.index("G002")] == 0
    federated = ExpressionTransform.from_moments(
        sum(m["count"] for m in moments),
        np.sum([m["sum"] for m in moments], axis=0),
        np.sum([m["sumsq"] for m in moments], axis=0),
        genes=genes,
        gene_count=np.sum([m["gene_count"] for m in moments], axis=0),
        **layout.transform,
    )
    np.testing.assert_allclose(federated.mean, pooled.mean)
    np.testing.assert_allclose(federated.std, pooled.std)
