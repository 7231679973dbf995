"""Benchmark aid (issue #9): how much of the transfer ceiling the generated default's features carry at all.

The transfer ceiling of a cancer is the C-index of its true shared risk ``beta' z`` (``truth.csv``). No model
sees ``z``: the WSI patches carry a noisy copy ``zt = z + tau_w xi`` and the expression the pathway activities
``a = A z + a_e B_k u + tau_e xi'`` (fedprog/data/synth.py). This script computes, per cancer, the C-index of
the best estimate of the shared risk from those two noisy views, the posterior mean ``beta' E[z | zt, a]`` of
the linear-Gaussian model with the generator's own ``A``, ``tau_w``, ``tau_e``, ``a_e`` (the cancer-specific
term ``a_e B_k u`` counted as noise of its average covariance ``a_e^2 I``, as for a cancer never seen). It
assumes ``zt`` read perfectly from the patches and ``a`` from the genes, so it is an upper bound for any model
of these features: the *information ceiling*. The noise draws are fresh (seeded), averaged over ``--draws``.

    python simulations/information_ceiling.py [--draws 50] [data.synth overrides...]

Prints a table per cancer (oracle, transfer ceiling, information ceiling from WSI, expression, both) and one
final line ``information_ceiling: ...``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from fedprog.config import load_config
from fedprog.data.synth import SynthParams, _draw_shared, ensure_generated
from fedprog.report import markdown_table
from fedprog.survival.metrics import harrell_cindex

VIEWS = {"WSI": (True, False), "expression": (False, True), "both": (True, True)}


def posterior_shared_risk(
    z: np.ndarray, p: SynthParams, loading: np.ndarray, beta: np.ndarray, rng: np.random.Generator, view: str
) -> np.ndarray:
    """``beta' E[z | view]`` for fresh noisy views of ``z`` (n x q_s) from the generator's noise model."""
    use_wsi, use_expr = VIEWS[view]
    q = z.shape[1]
    tau_w, expr_sd = (
        p.wsi.shared_noise,
        float(np.hypot(p.expression.specific_strength, p.expression.pathway_noise)),
    )
    precision, rhs = np.eye(q), np.zeros_like(z)
    if use_wsi:
        noisy = z + tau_w * rng.standard_normal(z.shape)
        precision, rhs = precision + np.eye(q) / tau_w**2, rhs + noisy / tau_w**2
    if use_expr:
        activity = z @ loading.T + expr_sd * rng.standard_normal((len(z), loading.shape[0]))
        precision = precision + loading.T @ loading / expr_sd**2
        rhs = rhs + activity @ loading / expr_sd**2
    return np.linalg.solve(precision, rhs.T).T @ beta


def ceilings(cfg_overrides: list[str], draws: int) -> pd.DataFrame:
    """Per cancer: oracle, transfer ceiling and the information ceiling of each view (mean over ``draws``)."""
    cfg = load_config("simulate", cfg_overrides)
    root = ensure_generated(cfg.data)
    p = SynthParams.from_config(cfg.data.synth)
    shared = _draw_shared(p)
    truth = pd.read_csv(f"{root}/{cfg.data.truth}")
    rows = []
    for cancer in p.cancers:
        labels = (
            pd.read_csv(f"{root}/{cancer}/{cfg.data.labels}").drop_duplicates("case_id").set_index("case_id")
        )
        part = truth[truth["cohort"] == cancer].set_index("case_id")
        labels = labels.loc[part.index]
        time, censorship = labels["survival_months"].to_numpy(float), labels["censorship"].to_numpy(int)
        z = part[[f"z{i + 1}" for i in range(p.shared_factors)]].to_numpy(float)
        row = {
            "cancer": cancer,
            "oracle": harrell_cindex(time, censorship, part["true_risk"].to_numpy(float)),
            "transfer ceiling": harrell_cindex(time, censorship, part["shared_risk"].to_numpy(float)),
        }
        for view in VIEWS:
            scores = [
                harrell_cindex(
                    time,
                    censorship,
                    posterior_shared_risk(
                        z, p, shared.pathway_loading, shared.beta, np.random.default_rng([d, 7]), view
                    ),
                )
                for d in range(draws)
            ]
            row[f"information, {view}"] = float(np.mean(scores))
        rows.append(row)
    table = pd.DataFrame(rows)
    mean = table.drop(columns="cancer").mean().to_dict()
    return pd.concat([table, pd.DataFrame([{"cancer": "mean", **mean}])], ignore_index=True)


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50, help="noise draws averaged per cancer")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the simulate config (data.synth.*)")
    args = parser.parse_args(argv)
    table = ceilings(args.overrides, args.draws)
    print(markdown_table(table, floatfmt=3))
    last = table.iloc[-1]
    share = last["information, both"] / last["transfer ceiling"]
    print(
        f"information_ceiling: mean over cancers transfer ceiling {last['transfer ceiling']:.3f}, "
        f"information ceiling (WSI + expression) {last['information, both']:.3f} = {share:.3f} of it; "
        f"WSI alone {last['information, WSI']:.3f}, expression alone {last['information, expression']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
