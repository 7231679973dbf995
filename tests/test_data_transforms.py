"""Expression and tabular transforms: fitted on training data only, serializable, federated moments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from fedprog.data import ExpressionTransform, GeneMismatchError, InvalidValueError, TabularTransform


def _expr(seed: int, n: int = 30, genes: int = 5, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        rng.normal(shift, 1.0, (n, genes)),
        columns=[f"g{i}" for i in range(genes)],
        index=[f"c{seed}_{i}" for i in range(n)],
    )


def test_clip_standardize_clips_outliers_then_standardizes() -> None:
    train = _expr(0)
    train.iloc[0, 0] = 36893.0  # a real TCGA z-score artefact
    t = ExpressionTransform(clip=10.0, z_clip=3.0).fit(train)
    clipped = train.clip(-10, 10)
    np.testing.assert_allclose(t.mean, clipped.mean().to_numpy())
    np.testing.assert_allclose(t.std, clipped.std(ddof=0).to_numpy())
    out = t.transform(train)
    assert out.dtype == np.float32 and out.shape == (30, 5)
    assert np.abs(out).max() <= 3.0 + 1e-6


def test_from_moments_equals_pooled_fit() -> None:
    sites = [_expr(1), _expr(2, n=17, shift=1.0)]
    t = ExpressionTransform(clip=2.0)
    moments = [t.moments(s) for s in sites]
    fed = ExpressionTransform.from_moments(
        sum(m["count"] for m in moments),
        sum(m["sum"] for m in moments),
        sum(m["sumsq"] for m in moments),
        genes=moments[0]["genes"],
        clip=2.0,
    )
    pooled = ExpressionTransform(clip=2.0).fit(pd.concat(sites))
    np.testing.assert_allclose(fed.mean, pooled.mean)
    np.testing.assert_allclose(fed.std, pooled.std)
    target = _expr(9, shift=5.0)
    np.testing.assert_allclose(fed.transform(target), pooled.transform(target), rtol=1e-6)


def test_state_dict_roundtrip_and_no_refit_on_target() -> None:
    t = ExpressionTransform().fit(_expr(0))
    state = t.state_dict()
    target = _expr(5, shift=3.0)
    before = t.transform(target)
    assert t.state_dict() == state  # transforming never refits
    assert before.mean() > 2.0  # the shift stays visible: target statistics are not used
    again = ExpressionTransform.from_state_dict(state)
    np.testing.assert_array_equal(again.transform(target), before)


def test_rank_gives_normal_scores_per_sample() -> None:
    df = pd.DataFrame([[3.0, 1.0, 2.0, 100.0]], columns=list("abcd"))
    out = ExpressionTransform(method="rank").fit(df).transform(df)
    expected = norm.ppf((np.array([3, 1, 2, 4]) - 0.5) / 4)
    np.testing.assert_allclose(out[0], expected, rtol=1e-5)


def test_transform_errors_name_genes_and_cases() -> None:
    t = ExpressionTransform().fit(_expr(0))
    with pytest.raises(GeneMismatchError, match=r"lacks 1 of the transform's 5 genes: g3"):
        t.transform(_expr(1).drop(columns=["g3"]))
    bad = _expr(1)
    bad.iloc[2, 1] = np.nan
    with pytest.raises(InvalidValueError, match=r"column\(s\) g1 for case\(s\) c1_2"):
        t.transform(bad)
    with pytest.raises(RuntimeError, match="before fit"):
        ExpressionTransform().transform(_expr(0))
    with pytest.raises(ValueError, match="method='zscore'"):
        ExpressionTransform(method="zscore")


def test_tabular_transform() -> None:
    train = pd.DataFrame({"age": [40.0, 60.0, np.nan, 50.0], "stage": ["I", "II", np.nan, "I"]})
    t = TabularTransform(categorical=["stage"]).fit(train)
    assert t.feature_names == ["age", "age__missing", "stage=<missing>", "stage=I", "stage=II"]
    test = pd.DataFrame({"age": [50.0, np.nan], "stage": ["IV", "II"]})
    out = t.transform(test)
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.0, 0.0, 0.0])  # mean age; unseen stage IV -> zeros
    np.testing.assert_allclose(out[1], [0.0, 1.0, 0.0, 0.0, 1.0])
    again = TabularTransform.from_state_dict(t.state_dict())
    np.testing.assert_array_equal(again.transform(test), out)
    raw = TabularTransform(standardize=False).fit(train[["age"]].fillna(1.0))
    assert raw.transform(pd.DataFrame({"age": [33.0]}))[0, 0] == 33.0


def _clinical(seed: int, n: int, with_nan: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(55.0 + 5 * seed, 10.0, n)
    if with_nan:
        age[1] = np.nan
    stage = rng.choice(["I", "II", "III"] if seed else ["I", "II"], n).astype(object)
    stage[0] = np.nan
    return pd.DataFrame(
        {"age": age, "stage": stage, "is_female": rng.integers(0, 2, n)},
        index=[f"s{seed}_{i}" for i in range(n)],
    )


def test_tabular_from_moments_equals_pooled_fit() -> None:
    sites = [_clinical(0, 25, with_nan=False), _clinical(1, 18, with_nan=True), _clinical(2, 9, False)]
    template = TabularTransform(categorical=["stage"])
    moments = [template.moments(df) for df in sites]
    assert moments[0]["numeric"]["age"]["count"] == 25 and moments[1]["numeric"]["age"]["n_missing"] == 1
    assert sum(moments[2]["levels"]["stage"].values()) == 9
    federated = TabularTransform.from_moments(TabularTransform.merge_moments(moments), categorical=["stage"])
    central = TabularTransform(categorical=["stage"]).fit(pd.concat(sites))
    assert federated.feature_names == central.feature_names
    assert "age__missing" in federated.feature_names and "stage=III" in federated.feature_names
    for col in central.numeric:
        assert federated.mean[col] == pytest.approx(central.mean[col], rel=1e-12)
        assert federated.std[col] == pytest.approx(central.std[col], rel=1e-9)
    target = _clinical(3, 7, with_nan=True)
    np.testing.assert_allclose(federated.transform(target), central.transform(target), rtol=1e-6, atol=1e-6)
    again = TabularTransform.from_state_dict(federated.state_dict())
    np.testing.assert_array_equal(again.transform(target), federated.transform(target))


def test_tabular_moments_errors_name_the_column() -> None:
    template = TabularTransform(categorical=["stage"])
    good = template.moments(_clinical(0, 5, with_nan=False))
    other = TabularTransform(categorical=[]).moments(_clinical(0, 5, with_nan=False).drop(columns="stage"))
    with pytest.raises(GeneMismatchError, match="part 1 has columns"):
        TabularTransform.merge_moments([good, other])
    with pytest.raises(GeneMismatchError, match="categorical"):
        TabularTransform.from_moments(good, categorical=[])
    with pytest.raises(GeneMismatchError, match=r"\['grade'\] not in the table"):
        TabularTransform(categorical=["grade"]).moments(_clinical(0, 5, with_nan=False))
    empty = template.moments(_clinical(0, 5, with_nan=False).assign(age=np.nan))
    with pytest.raises(InvalidValueError, match="column age has no value"):
        TabularTransform.from_moments(empty, categorical=["stage"])
    with pytest.raises(InvalidValueError, match="infinite value in column age"):
        template.moments(_clinical(0, 5, with_nan=False).assign(age=np.inf))
