"""Generate the default multi-site, multimodal survival dataset (``fedprog synth out=DIR``).

The dataset is a fair cross-cancer benchmark: risk has a part shared by every cancer (the same function of the
shared factors everywhere) and a cancer-specific part whose direction is drawn at random per cancer. Both
modalities see the shared factors; WSI hides them behind a cancer- and site-specific per-channel style (the
mean and scale of each channel across a bag's patches) that also carries the cancer-specific factors, so a
method that learns to ignore style drops the non-transferable part and keeps the transferable one. Expression
sees the shared factors through pathways common to all cancers plus cancer-specific pathway effects, and site
batch effects. ``truth.csv`` holds the true risk, its shared part and the latent factors, from which
:func:`site_ceilings` computes the oracle and transfer ceilings of every site. Files follow
docs/architecture.md section 1; the same parameters and seed give byte-identical files.

Generative model
----------------
Indices: cancer k = 0..K-1, site s (of cancer k), patient i, slide l, patch j, channel c, gene g, pathway p.
All parameters named below are keys of ``data.synth`` (configs/data/synth.yaml).

Latent factors (per patient)::

    z_i ~ N(0, I_{q_s})       shared factors (q_s = shared_factors)
    u_i ~ N(0, I_{q_c})       cancer-specific factors (q_c = specific_factors)

Risk, the linear predictor (truth.csv: ``true_risk``; its two terms are ``shared_risk``, ``specific_risk``)::

    eta_i   = beta' z_i + gamma_k' u_i
    beta    = shared_effect * (random unit vector), the same in every cancer
    gamma_k = specific_effect * (random unit vector), drawn independently for every cancer

The transfer ceiling of a cancer is the C-index of ``shared_risk`` (what a model that never saw the cancer can
reach at best); the oracle is the C-index of ``true_risk``.

Survival: Weibull proportional hazards with a cancer-specific baseline,
S(t) = exp(-(t / lambda_k)^nu_k e^eta)::

    T_i = lambda_k (E_i exp(-eta_i))^(1 / nu_k),   E_i ~ Exp(1)
    C_i = min(c_k E'_i, F),                        E'_i ~ Exp(1) independent of T_i; F = max_followup
    survival_months = min(T_i, C_i),   censorship = 1[C_i < T_i]

The censoring scale c_k is set in closed form so that P(C < T) = ``censoring[k]`` on ``calibration_draws``
independent draws of the model (eta ~ N(0, |beta|^2 + |gamma_k|^2)), not on the patients themselves.

WSI patch features. A patient has 1 slide, or 2 with probability ``second_slide_fraction``; slide l has
n_l ~ U(patches) patches::

    zt_i  = z_i + tau_w xi_i                  noisy copy of the shared factors (tau_w = shared_noise)
    rho_i ~ U(informative_fraction),  pi_lj ~ Bernoulli(rho_i)       the patches that carry the signal
    x_ljc = b_c + pi_lj [a_t t_c + a_z (L_z zt_i)_c] + d_lc + sigma_p eps_ljc        content
    f_ljc = mu_ic + s_ic x_ljc                                                        style
    mu_ic = m_kc + m_sc + a_u (L_u u_i)_c,   log s_ic = r_kc + r_sc + a_v (L_v u_i)_c

    m_kc ~ N(0, cancer_mean_shift^2), r_kc ~ N(0, cancer_log_scale^2)     cancer style
    m_sc ~ N(0, site_mean_shift^2),   r_sc ~ N(0, site_log_scale^2)       site style
    b_c ~ N(0, background_sd^2), t_c ~ N(0, 1) (marker), L_u, L_v, L_z entries ~ N(0, 1/q),
    d_lc ~ N(0, slide_noise^2), eps ~ N(0, 1)

with a_t = marker_strength, a_z = ``wsi.shared_strength``, a_u = ``wsi.specific_strength``, a_v =
specific_log_scale, sigma_p = patch_noise. Standardizing each channel across a bag's patches removes mu and s
exactly (style and the cancer-specific factors) and keeps the content: the informative patches (marked by t)
carry z (``data.bag_standardize=true`` does exactly that). Raw features predict well in-domain through u,
whose risk is read differently in every cancer.

Expression. pathways.csv is the 0/1 membership M: every gene has one primary pathway and joins each other
pathway with probability ``pathway_overlap``::

    a_ip = (A z_i)_p + a_e (B_k u_i)_p + tau_e xi'_ip          pathway activities (tau_e = pathway_noise)
    e_ig = sum_p M_gp W_gp a_ip / sqrt(sum_p M_gp) + sigma_g eps'_ig            (sigma_g = gene_noise)
    x_ig = mu_g + c_kg + h_sg + exp(l_sg) e_ig

    A entries ~ N(0, 1/q_s) (all cancers), B_k entries ~ N(0, 1/q_c) (per cancer; a_e = expression
    .specific_strength), W_gp ~ N(0, loading_sd^2), mu_g ~ N(baseline_mean, baseline_sd^2)
    c_kg ~ N(0, cancer_shift^2)                                  cancer shift
    h_sg ~ N(0, site_shift^2), l_sg ~ N(0, site_log_scale^2)     site batch effect (gene-wise)

Random streams are keyed by (seed, part[, cancer]): one cancer's draws do not depend on another's size.
Case ids are ``<case_prefix>-<site>-<nnnn>`` (``SYNT-A1-0001``): characters 6-7 are the site code, like
TCGA's tissue-source site; cancer k has the sites ``<letter k>1`` .. ``<letter k>9``, then ``<letter k>A`` ..
``<letter k>Z`` (at most 35 per cancer). ``truth.csv`` has one row per case: cohort, case_id, true_risk,
shared_risk, specific_risk, site, z1..z_qs, u1..u_qc.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import shutil
import string
import tempfile
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fedprog.data.layout import MANIFEST

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the generative model changes: stored datasets are then regenerated
LABELS = "labels.csv"
RNA = "rna.csv.gz"
FEATURES = "features"
GROUPS = "groups/pathways.csv"
TRUTH = "truth.csv"
SITE_COLUMN = "site"
CASE_PREFIX_LENGTH = 4  # so that barcode characters 6-7 are the site code, as in TCGA-2F-A9KO
SITE_DIGITS = "123456789" + string.ascii_uppercase  # 2nd character of a site code: at most 35 per cancer


class SynthError(ValueError):
    """Invalid generator parameters, or an output folder the generator must not overwrite."""


# -------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class RiskParams:
    """Effect sizes of the risk (see the module docstring)."""

    shared_effect: float
    specific_effect: float


@dataclass(frozen=True)
class SurvivalParams:
    """Cancer-specific Weibull baselines and censoring."""

    weibull_scale: tuple[float, ...]
    weibull_shape: tuple[float, ...]
    censoring: tuple[float, ...]
    max_followup: float
    calibration_draws: int
    time_decimals: int


@dataclass(frozen=True)
class WsiParams:
    """WSI patch-feature model."""

    background_sd: float
    cancer_mean_shift: float
    cancer_log_scale: float
    site_mean_shift: float
    site_log_scale: float
    specific_strength: float
    specific_log_scale: float
    marker_strength: float
    shared_strength: float
    shared_noise: float
    informative_fraction: tuple[float, ...]
    slide_noise: float
    patch_noise: float


@dataclass(frozen=True)
class ExpressionParams:
    """Expression model: pathway activities, genes, cancer shift and site batch effects."""

    baseline_mean: float
    baseline_sd: float
    loading_sd: float
    pathway_noise: float
    specific_strength: float
    gene_noise: float
    cancer_shift: float
    site_shift: float
    site_log_scale: float
    decimals: int


@dataclass(frozen=True)
class SynthParams:
    """All generator parameters (``data.synth``); build with :meth:`from_config`."""

    seed: int
    case_prefix: str
    cancers: tuple[str, ...]
    n_patients: tuple[int, ...]
    site_fractions: tuple[float, ...]
    second_slide_fraction: float
    patches: tuple[int, ...]
    feature_dim: int
    n_genes: int
    n_pathways: int
    pathway_overlap: float
    shared_factors: int
    specific_factors: int
    risk: RiskParams
    survival: SurvivalParams
    wsi: WsiParams
    expression: ExpressionParams

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig) -> SynthParams:
        """Read and check ``data.synth``; unknown or missing keys raise :class:`SynthError` naming the key."""
        tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        params = _build(cls, tree, "data.synth")
        params._check()
        return params

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) as stored under ``synth:`` in the manifest."""
        return _plain(dataclasses.asdict(self))

    @property
    def sites(self) -> dict[str, list[str]]:
        """Site codes of each cancer, e.g. ``{"c0": ["A1", "A2"], ...}``."""
        letters = string.ascii_uppercase
        return {
            cancer: [f"{letters[k]}{SITE_DIGITS[s]}" for s in range(len(self.site_fractions))]
            for k, cancer in enumerate(self.cancers)
        }

    def _check(self) -> None:
        """Raise :class:`SynthError` naming the first inconsistent key."""
        k = len(self.cancers)
        if not 1 <= k <= len(string.ascii_uppercase) or len(set(self.cancers)) != k:
            raise SynthError(f"data.synth.cancers: expected 1-26 distinct names, got {list(self.cancers)}")
        per_cancer = {
            "n_patients": self.n_patients,
            "survival.weibull_scale": self.survival.weibull_scale,
            "survival.weibull_shape": self.survival.weibull_shape,
            "survival.censoring": self.survival.censoring,
        }
        for key, values in per_cancer.items():
            if len(values) != k:
                raise SynthError(
                    f"data.synth.{key}: expected {k} values, one per cancer {list(self.cancers)}"
                )
        if len(self.case_prefix) != CASE_PREFIX_LENGTH or "-" in self.case_prefix:
            raise SynthError(
                f"data.synth.case_prefix: expected {CASE_PREFIX_LENGTH} characters without '-' (so that "
                f"barcode characters 6-7 are the site code), got {self.case_prefix!r}"
            )
        n_sites = len(self.site_fractions)
        if not 1 <= n_sites <= len(SITE_DIGITS) or min(self.site_fractions) <= 0:
            raise SynthError(
                f"data.synth.site_fractions: expected 1-{len(SITE_DIGITS)} positive values, got "
                f"{list(self.site_fractions)}"
            )
        for cancer, n in zip(self.cancers, self.n_patients, strict=True):
            if n < n_sites:
                raise SynthError(
                    f"data.synth.n_patients: cancer {cancer} has {n} patients for {n_sites} sites"
                )
        probabilities = {
            "second_slide_fraction": self.second_slide_fraction,
            "pathway_overlap": self.pathway_overlap,
        }
        for key, rate in probabilities.items():
            if not 0 <= rate <= 1:
                raise SynthError(f"data.synth.{key}: expected a probability in [0, 1], got {rate}")
        for cancer, rate in zip(self.cancers, self.survival.censoring, strict=True):
            if not 0 <= rate < 1:
                raise SynthError(
                    f"data.synth.survival.censoring: cancer {cancer}: expected [0, 1), got {rate}"
                )
        ranges = {
            "patches": (self.patches, 1, None),
            "wsi.informative_fraction": (self.wsi.informative_fraction, 0, 1),
        }
        for key, (pair, low, high) in ranges.items():
            if len(pair) != 2 or not low <= pair[0] <= pair[1] or (high is not None and pair[1] > high):
                raise SynthError(
                    f"data.synth.{key}: expected [min, max] in [{low}, {high or 'inf'}], got {pair}"
                )
        counts = {
            "feature_dim": self.feature_dim,
            "n_pathways": self.n_pathways,
            "shared_factors": self.shared_factors,
            "specific_factors": self.specific_factors,
            "survival.calibration_draws": self.survival.calibration_draws,
        }
        for key, value in counts.items():
            if value < 1:
                raise SynthError(f"data.synth.{key}: expected >= 1, got {value}")
        if self.n_genes < self.n_pathways:
            raise SynthError(f"data.synth.n_genes ({self.n_genes}) must be >= n_pathways ({self.n_pathways})")
        positive = [*self.survival.weibull_scale, *self.survival.weibull_shape, self.survival.max_followup]
        if min(positive) <= 0:
            raise SynthError("data.synth.survival: weibull_scale, weibull_shape and max_followup must be > 0")


def _build(cls: type, tree: Any, path: str) -> Any:
    """Instantiate the (nested) parameter dataclass ``cls`` from a plain dict, checking keys and types."""
    if not isinstance(tree, Mapping):
        raise SynthError(f"{path}: expected a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown, missing = sorted(set(tree) - names), sorted(names - set(tree))
    if unknown or missing:
        raise SynthError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    values = {}
    for name in names:
        hint, value, key = hints[name], tree[name], f"{path}.{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, list | tuple):
                raise SynthError(f"{key}: expected a list, got {value!r}")
            item = typing.get_args(hint)[0]
            values[name] = tuple(_scalar(item, v, key) for v in value)
        else:
            values[name] = _scalar(hint, value, key)
    return cls(**values)


def _scalar(kind: type, value: Any, key: str) -> Any:
    ok = (
        isinstance(value, str)
        if kind is str
        else isinstance(value, int | float) and not isinstance(value, bool)
    )
    if kind is int and ok and float(value) != int(value):
        ok = False
    if not ok:
        raise SynthError(f"{key}: expected {kind.__name__}, got {value!r}")
    return kind(value)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(value) for value in node]
    return node


# -------------------------------------------------------------------------------- generation


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for (seed, key...)."""
    return np.random.default_rng([seed, *key])


_GLOBAL, _CANCER, _CALIBRATION = 0, 1, 2  # stream keys


@dataclass(frozen=True)
class _Shared:
    """Parameters shared by all cancers (drawn from the global stream)."""

    beta: np.ndarray  # [q_s]
    gammas: np.ndarray  # [K, q_c]
    loading_u: np.ndarray  # [D, q_c]: u -> bag-level channel means (style)
    loading_v: np.ndarray  # [D, q_c]: u -> bag-level channel log scales (style)
    loading_z: np.ndarray  # [D, q_s]
    marker: np.ndarray  # [D] the direction that marks informative patches (entries N(0, 1))
    background: np.ndarray  # [D]
    pathway_loading: np.ndarray  # A, [P, q_s]
    membership: np.ndarray  # M, [G, P] 0/1
    gene_loading: np.ndarray  # M * W / sqrt(sum_p M), [G, P]
    gene_baseline: np.ndarray  # mu_g, [G]
    genes: list[str]
    pathways: list[str]


def _draw_shared(p: SynthParams) -> _Shared:
    rng = _rng(p.seed, _GLOBAL)
    q_s, q_c, dim, n_genes, n_paths = (
        p.shared_factors,
        p.specific_factors,
        p.feature_dim,
        p.n_genes,
        p.n_pathways,
    )
    beta = rng.standard_normal(q_s)
    beta *= p.risk.shared_effect / np.linalg.norm(beta)
    k = len(p.cancers)
    gammas = rng.standard_normal((k, q_c))  # independent random directions: no symmetry across cancers
    gammas *= p.risk.specific_effect / np.linalg.norm(gammas, axis=1, keepdims=True)
    loading_u = rng.standard_normal((dim, q_c)) / np.sqrt(q_c)
    loading_v = rng.standard_normal((dim, q_c)) / np.sqrt(q_c)
    loading_z = rng.standard_normal((dim, q_s)) / np.sqrt(q_s)
    marker = rng.standard_normal(dim)
    background = rng.normal(0.0, p.wsi.background_sd, dim)
    pathway_loading = rng.standard_normal((n_paths, q_s)) / np.sqrt(q_s)
    membership = (rng.random((n_genes, n_paths)) < p.pathway_overlap).astype(np.int64)
    membership[np.arange(n_genes), rng.permutation(np.arange(n_genes) % n_paths)] = 1  # primary pathway
    weights = rng.normal(0.0, p.expression.loading_sd, (n_genes, n_paths))
    gene_loading = membership * weights / np.sqrt(membership.sum(axis=1, keepdims=True))
    baseline = rng.normal(p.expression.baseline_mean, p.expression.baseline_sd, n_genes)
    genes = [f"GENE{g + 1:0{len(str(n_genes))}d}" for g in range(n_genes)]
    pathways = [f"PATHWAY_{q + 1:0{len(str(n_paths))}d}" for q in range(n_paths)]
    return _Shared(
        beta=beta,
        gammas=gammas,
        loading_u=loading_u,
        loading_v=loading_v,
        loading_z=loading_z,
        marker=marker,
        background=background,
        pathway_loading=pathway_loading,
        membership=membership,
        gene_loading=gene_loading,
        gene_baseline=baseline,
        genes=genes,
        pathways=pathways,
    )


def _censoring_scale(p: SynthParams, k: int, risk_sd: float) -> float:
    """Scale c_k of the exponential censoring so that P(min(c_k E', F) < T) = censoring[k] under the model."""
    rng = _rng(p.seed, _CALIBRATION, k)
    n, target, followup = p.survival.calibration_draws, p.survival.censoring[k], p.survival.max_followup
    times = _weibull_times(
        rng, rng.normal(0.0, risk_sd, n), p.survival.weibull_scale[k], p.survival.weibull_shape[k]
    )
    ratio = times / rng.exponential(1.0, n)  # censored by the exponential part iff c_k < T / E'
    always = times > followup  # censored by the end of follow-up whatever c_k
    if always.mean() > target:
        raise SynthError(
            f"data.synth.survival: cancer {p.cancers[k]}: {always.mean():.2f} of event times exceed "
            f"max_followup={followup}, above the target censoring {target}; raise max_followup or the target"
        )
    ratio[always] = np.inf
    ordered = np.sort(ratio)  # censored fraction at scale c is mean(ratio > c)
    position = int(round((1.0 - target) * n))
    return float(ordered[position]) if position < n else float("inf")  # target 0: only end of follow-up


def _weibull_times(rng: np.random.Generator, risk: np.ndarray, scale: float, shape: float) -> np.ndarray:
    """Draw one T per entry of ``risk`` with S(t) = exp(-(t / scale)^shape exp(risk))."""
    return scale * (rng.exponential(1.0, risk.shape) * np.exp(-risk)) ** (1.0 / shape)


def _split_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split n into len(fractions) sizes >= 1 proportional to fractions (largest remainder)."""
    share = np.asarray(fractions) / np.sum(fractions) * n
    sizes = np.maximum(np.floor(share).astype(int), 1)
    while sizes.sum() < n:
        sizes[np.argmax(share - sizes)] += 1
    while sizes.sum() > n:
        sizes[np.argmax(np.where(sizes > 1, sizes - share, -np.inf))] -= 1
    return sizes.tolist()


@dataclass
class _CohortData:
    labels: pd.DataFrame  # one row per slide
    rna: pd.DataFrame
    truth: pd.DataFrame
    bags: dict[str, np.ndarray]  # slide_id -> [n_patches, D] float32


def _draw_cohort(p: SynthParams, k: int, shared: _Shared) -> _CohortData:
    """Draw every patient of cancer k (module docstring equations)."""
    rng = _rng(p.seed, _CANCER, k)
    n, n_genes, n_sites = p.n_patients[k], p.n_genes, len(p.site_fractions)
    sites = p.sites[p.cancers[k]]
    style = _draw_style(rng, p, n_sites)  # (cancer + site) per-channel mean and log scale, [S, D] each
    expr = p.expression
    cancer_gene_shift = rng.normal(0.0, expr.cancer_shift, n_genes)  # c_k
    site_gene_shift = rng.normal(0.0, expr.site_shift, (n_sites, n_genes))  # h_s
    site_gene_scale = np.exp(rng.normal(0.0, expr.site_log_scale, (n_sites, n_genes)))  # exp(l_s)
    specific_pathways = rng.standard_normal((p.n_pathways, p.specific_factors)) / np.sqrt(p.specific_factors)
    # patients: sites, latents, risk, times
    site_index = np.repeat(np.arange(n_sites), _split_sizes(n, p.site_fractions))
    rng.shuffle(site_index)
    z = rng.standard_normal((n, p.shared_factors))
    u = rng.standard_normal((n, p.specific_factors))
    shared_risk, specific_risk = z @ shared.beta, u @ shared.gammas[k]
    risk = shared_risk + specific_risk
    times = _weibull_times(rng, risk, p.survival.weibull_scale[k], p.survival.weibull_shape[k])
    risk_sd = float(np.hypot(p.risk.shared_effect, p.risk.specific_effect))
    censor_times = np.minimum(
        _censoring_scale(p, k, risk_sd) * rng.exponential(1.0, n), p.survival.max_followup
    )
    censored = censor_times < times
    resolution = 10.0**-p.survival.time_decimals
    months = np.maximum(np.round(np.minimum(times, censor_times), p.survival.time_decimals), resolution)
    # expression: shared pathways (A z) plus cancer-specific ones (B_k u)
    activity = (
        z @ shared.pathway_loading.T
        + expr.specific_strength * u @ specific_pathways.T
        + expr.pathway_noise * rng.standard_normal((n, p.n_pathways))
    )
    signal = activity @ shared.gene_loading.T + expr.gene_noise * rng.standard_normal((n, n_genes))
    values = (
        shared.gene_baseline
        + cancer_gene_shift
        + site_gene_shift[site_index]
        + site_gene_scale[site_index] * signal
    )
    case_ids = np.empty(n, dtype=object)
    for s, site in enumerate(sites):
        members = np.flatnonzero(site_index == s)
        case_ids[members] = [f"{p.case_prefix}-{site}-{j + 1:04d}" for j in range(members.size)]
    rows, bags = _draw_bags(rng, p, shared, style, z, u, site_index, case_ids, sites)
    for row in rows:
        i = row.pop()
        row[1:1] = [months[i], int(censored[i])]
    labels = pd.DataFrame(rows, columns=["case_id", "survival_months", "censorship", "slide_id", SITE_COLUMN])
    rna = pd.DataFrame(values, columns=shared.genes)
    rna.insert(0, "case_id", case_ids)
    truth = pd.DataFrame(
        {
            "cohort": p.cancers[k],
            "case_id": case_ids,
            "true_risk": risk,
            "shared_risk": shared_risk,
            "specific_risk": specific_risk,
            SITE_COLUMN: [sites[s] for s in site_index],
            **{f"z{j + 1}": z[:, j] for j in range(z.shape[1])},
            **{f"u{j + 1}": u[:, j] for j in range(u.shape[1])},
        }
    )
    order = np.argsort(case_ids)
    return _CohortData(
        labels=labels.sort_values(["case_id", "slide_id"], ignore_index=True),
        rna=rna.iloc[order].reset_index(drop=True),
        truth=truth.iloc[order].reset_index(drop=True),
        bags=bags,
    )


def _draw_style(rng: np.random.Generator, p: SynthParams, n_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel style of each site of one cancer: mean m_ks = m_k + m_s and log scale r_ks = r_k + r_s."""
    wsi, dim = p.wsi, p.feature_dim
    cancer_mean = rng.normal(0.0, wsi.cancer_mean_shift, dim)
    cancer_log_scale = rng.normal(0.0, wsi.cancer_log_scale, dim)
    site_mean = rng.normal(0.0, wsi.site_mean_shift, (n_sites, dim))
    site_log_scale = rng.normal(0.0, wsi.site_log_scale, (n_sites, dim))
    return cancer_mean + site_mean, cancer_log_scale + site_log_scale


def _draw_bags(
    rng: np.random.Generator,
    p: SynthParams,
    shared: _Shared,
    style: tuple[np.ndarray, np.ndarray],
    z: np.ndarray,
    u: np.ndarray,
    site_index: np.ndarray,
    case_ids: np.ndarray,
    site_names: list[str],
) -> tuple[list[list[Any]], dict[str, np.ndarray]]:
    """WSI bags: the shared factors in the informative patches, the specific ones in each bag's style."""
    wsi, dim = p.wsi, p.feature_dim
    noisy_z = z + wsi.shared_noise * rng.standard_normal(z.shape)
    pattern = wsi.marker_strength * shared.marker + wsi.shared_strength * noisy_z @ shared.loading_z.T
    bag_mean = style[0][site_index] + wsi.specific_strength * u @ shared.loading_u.T
    bag_scale = np.exp(style[1][site_index] + wsi.specific_log_scale * u @ shared.loading_v.T)
    informative = rng.uniform(*wsi.informative_fraction, len(z))
    n_slides = 1 + (rng.random(len(z)) < p.second_slide_fraction)
    rows: list[list[Any]] = []
    bags = {}
    for i in range(len(z)):
        for slide in range(n_slides[i]):
            slide_id = f"{case_ids[i]}-01Z-00-DX{slide + 1}"
            n_patches = int(rng.integers(p.patches[0], p.patches[1], endpoint=True))
            carries = rng.random((n_patches, 1)) < informative[i]
            latent = (
                shared.background
                + carries * pattern[i]
                + rng.normal(0.0, wsi.slide_noise, dim)
                + wsi.patch_noise * rng.standard_normal((n_patches, dim))
            )
            bags[slide_id] = (bag_mean[i] + bag_scale[i] * latent).astype(np.float32)
            rows.append([case_ids[i], slide_id, site_names[site_index[i]], i])
    return rows, bags


# -------------------------------------------------------------------------------- writing


def _write_csv(frame: pd.DataFrame, path: Path, decimals: int, *, compress: bool = False) -> None:
    text = frame.to_csv(index=False, float_format=f"%.{decimals}f", lineterminator="\n").encode()
    path.write_bytes(gzip.compress(text, mtime=0) if compress else text)  # mtime=0: byte-identical


def _manifest(p: SynthParams) -> dict[str, Any]:
    """The fedprog.yaml manifest (architecture.md section 1); the generator parameters go under ``synth``."""
    return {
        "name": "synth",
        "cohorts": list(p.cancers),
        "labels": LABELS,
        "tables": {"rna": {"path": RNA}},
        "expression": "rna",
        "strong": "wsi",
        "features": FEATURES,
        "groups": {"path": GROUPS, "kind": "compositions", "min_genes": 1},
        "site_column": SITE_COLUMN,
        "truth": TRUTH,
        "synth": _stamp(p),
    }


def _stamp(p: SynthParams) -> dict[str, Any]:
    return {**p.to_dict(), "generator_version": GENERATOR_VERSION}


def _write_dataset(p: SynthParams, root: Path) -> dict[str, dict[str, float]]:
    """Write every file of the dataset into the (empty) folder ``root``; return a per-cohort summary."""
    shared = _draw_shared(p)
    (root / GROUPS).parent.mkdir(parents=True)
    groups = pd.DataFrame(shared.membership, columns=shared.pathways)
    groups.insert(0, "gene", shared.genes)
    _write_csv(groups, root / GROUPS, 0)
    truths, summary = [], {}
    for k, cancer in enumerate(p.cancers):
        data = _draw_cohort(p, k, shared)
        folder = root / cancer / FEATURES
        folder.mkdir(parents=True)
        _write_csv(data.labels, root / cancer / LABELS, p.survival.time_decimals)
        _write_csv(data.rna, root / cancer / RNA, p.expression.decimals, compress=True)
        for slide_id, bag in data.bags.items():
            torch.save(torch.from_numpy(bag), folder / f"{slide_id}.pt")  # own storage: no hidden extra bytes
        truths.append(data.truth)
        cases = data.labels.drop_duplicates("case_id")
        summary[cancer] = {
            "patients": len(cases),
            "slides": len(data.labels),
            "sites": cases[SITE_COLUMN].nunique(),
            "censored": float(cases["censorship"].mean()),
            "median_months": float(cases["survival_months"].median()),
        }
        log.info("synth: cohort %s: %s", cancer, summary[cancer])
    _write_csv(pd.concat(truths, ignore_index=True), root / TRUTH, 6)
    (root / MANIFEST).write_text(OmegaConf.to_yaml(OmegaConf.create(_manifest(p))))
    return summary


def stored_params(root: str | Path) -> dict[str, Any] | None:
    """Return the ``synth`` section of ``<root>/fedprog.yaml``, or None when there is no manifest.

    Raises
    ------
    SynthError
        If the manifest exists but was not written by this generator (no ``synth`` section).
    """
    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return None
    stamp = OmegaConf.to_container(OmegaConf.load(manifest)).get("synth")
    if not isinstance(stamp, dict):
        raise SynthError(
            f"{manifest}: no 'synth' section, not a generated dataset; refusing to overwrite it "
            "(to use this dataset, add data=folder)"
        )
    return stamp


def generate(params: SynthParams | Mapping[str, Any] | DictConfig, out_dir: str | Path) -> Path:
    """Generate the dataset into ``out_dir`` (replacing an earlier generated dataset there).

    Parameters
    ----------
    params : SynthParams or mapping
        The ``data.synth`` parameters (see configs/data/synth.yaml and the module docstring).
    out_dir : str or Path
        Dataset root to write: ``fedprog.yaml``, ``groups/pathways.csv``, ``truth.csv`` and one folder per
        cancer with ``labels.csv`` (one row per slide), ``rna.csv.gz`` and ``features/<slide_id>.pt`` (float32
        tensors of shape ``(n_patches, feature_dim)``).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    SynthError
        On invalid parameters, or when ``out_dir`` is a non-empty folder that is not a generated dataset.

    Notes
    -----
    The files are written into a temporary sibling folder and renamed into place, so concurrent callers
    (several simulated sites generating on first use) never see a half-written dataset.
    """
    p = params if isinstance(params, SynthParams) else SynthParams.from_config(params)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and stored_params(out) is None)):
        raise SynthError(
            f"{out}: exists and is not a generated dataset (no {MANIFEST}); refusing to overwrite it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _write_dataset(p, staging)
        _move_into_place(staging, out, _stamp(p))
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    total = sum(cohort["patients"] for cohort in summary.values())
    log.info("synth: wrote %d patients in %d cohorts to %s", total, len(summary), out)
    return Path(out_dir)


def _move_into_place(staging: Path, out: Path, stamp: dict[str, Any]) -> None:
    """Rename ``staging`` to ``out``, replacing a generated dataset with other parameters.

    A dataset with the same parameters already at ``out`` (a concurrent caller finished first) is kept, so
    readers never see the folder disappear.
    """
    if out.exists() and stored_params(out) == stamp:
        log.info("synth: %s already holds these parameters (generated concurrently); keeping it", out)
        return
    retired = None
    if out.exists():
        retired = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
        os.replace(out, retired)
    try:
        os.rename(staging, out)
    except OSError:
        if stored_params(out) != stamp:  # a concurrent writer won with other parameters
            raise
        log.info("synth: %s was generated concurrently with the same parameters", out)
    if retired is not None:
        shutil.rmtree(retired)


def ensure_generated(data_cfg: Mapping[str, Any] | DictConfig) -> Path:
    """Return ``data_cfg.root``, generating the dataset there first when needed.

    Parameters
    ----------
    data_cfg : mapping
        The ``data`` config of ``data=synth``: ``root``, ``generate_if_missing`` and ``synth`` (parameters).

    Returns
    -------
    Path
        The dataset root. Nothing is written when ``<root>/fedprog.yaml`` already stores the same parameters,
        seed and generator version.

    Raises
    ------
    SynthError
        When the dataset is missing or stale and ``generate_if_missing`` is false, or ``root`` holds a dataset
        that this generator did not write.
    """
    root = Path(data_cfg["root"])
    p = SynthParams.from_config(data_cfg["synth"])
    stored, wanted = stored_params(root), _stamp(p)
    if stored == wanted:
        return root
    if stored is None:
        reason = f"no {MANIFEST}"
    else:
        changed = sorted(key for key in wanted.keys() | stored.keys() if stored.get(key) != wanted.get(key))
        reason = f"stored parameters differ in {changed}"
    if not data_cfg.get("generate_if_missing", False):
        raise SynthError(
            f"{root}: {reason} and data.generate_if_missing is false; run `fedprog synth out={root}`"
        )
    log.info("synth: generating %s (%s)", root, reason)
    return generate(p, root)


# -------------------------------------------------------------------------------- ceilings

CEILING_COLUMNS = ("cohort", "site", "n", "n_events", "oracle_c_index", "transfer_c_index")


def read_truth(root: str | Path) -> pd.DataFrame:
    """``<root>/truth.csv`` joined with the outcome (first label row per case), indexed by case id."""
    root = Path(root)
    truth = pd.read_csv(root / TRUTH, dtype={"case_id": str}).set_index("case_id")
    outcomes = []
    for cohort in truth["cohort"].unique():
        labels = pd.read_csv(root / str(cohort) / LABELS, dtype={"case_id": str})
        outcomes.append(
            labels.drop_duplicates("case_id").set_index("case_id")[["survival_months", "censorship"]]
        )
    outcome = pd.concat(outcomes)
    missing = truth.index.difference(outcome.index)
    if len(missing):
        raise SynthError(f"{root / TRUTH}: case {missing[0]} has no row in its cohort's {LABELS}")
    return truth.join(outcome)


def truth_ceilings(truth: pd.DataFrame, case_ids: Sequence[str] | None = None) -> dict[str, float]:
    """Oracle (true risk) and transfer (shared part) Harrell C-index on ``case_ids`` (all cases if None).

    ``truth`` is :func:`read_truth`'s frame. The oracle is the best any model can do on these patients; the
    transfer ceiling is the best a model can do without the target cancer's specific factors, i.e. trained on
    other cancers only.
    """
    from fedprog.survival.metrics import harrell_cindex

    rows = truth if case_ids is None else truth.loc[list(case_ids)]
    time_, censorship = rows["survival_months"].to_numpy(), rows["censorship"].to_numpy()
    return {
        "n": len(rows),
        "n_events": int((censorship == 0).sum()),
        "oracle_c_index": harrell_cindex(time_, censorship, rows["true_risk"].to_numpy()),
        "transfer_c_index": harrell_cindex(time_, censorship, rows["shared_risk"].to_numpy()),
    }


def site_ceilings(root: str | Path) -> pd.DataFrame:
    """Oracle and transfer ceilings of every site (``<cohort>-<code>``) and every cohort (site ``all``)."""
    truth = read_truth(root)
    rows = []
    for (cohort, code), group in truth.groupby(["cohort", SITE_COLUMN], sort=True):
        rows.append({"cohort": cohort, "site": f"{cohort}-{code}", **truth_ceilings(group)})
    for cohort, group in truth.groupby("cohort", sort=True):
        rows.append({"cohort": cohort, "site": "all", **truth_ceilings(group)})
    return pd.DataFrame(rows, columns=list(CEILING_COLUMNS))


def main(cfg: DictConfig) -> int:
    """``fedprog synth out=DIR``: generate the dataset and print a per-cohort summary."""
    out = generate(SynthParams.from_config(cfg.data.synth), cfg.out)
    print(f"fedprog synth: dataset written to {out}")
    print(f"{'cohort':<8} {'patients':>8} {'slides':>6} {'sites':>5} {'censored':>8} {'median_mo':>9}")
    for cancer in cfg.data.synth.cancers:
        labels = pd.read_csv(out / cancer / LABELS)
        cases = labels.drop_duplicates("case_id")
        print(
            f"{cancer:<8} {len(cases):>8} {len(labels):>6} {cases[SITE_COLUMN].nunique():>5} "
            f"{cases['censorship'].mean():>8.2f} {cases['survival_months'].median():>9.1f}"
        )
    print("\nCeilings (Harrell's C of the true risk = oracle, of its shared part = transfer ceiling):")
    print(site_ceilings(out).to_string(index=False, float_format="%.3f"))
    return 0
