"""Write tiny valid fedprog datasets into a temporary folder (used by the tests of every package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from fedprog.data.layout import MANIFEST, DatasetLayout

SITE_CODES = ("A1", "B2", "C3")
SITE_SHARES = (0.5, 0.3, 0.2)
MIN_EVENTS = 5


def case_id(cohort: str, site: str, i: int) -> str:
    """TCGA-like barcode whose characters 6-7 are the site code."""
    return f"TCGA-{site}-{cohort.upper()}{i:04d}"


def write_cohort(
    root: str | Path,
    cohort: str = "c0",
    n_cases: int = 20,
    n_genes: int = 12,
    n_groups: int = 3,
    bag_dim: int = 8,
    with_bags: bool = True,
    seed: int = 0,
) -> DatasetLayout:
    """Write one cohort (labels, rna.csv.gz, bags) plus ``groups/pathways.csv`` and the manifest.

    Calling it again with another ``cohort`` adds that cohort to the same dataset. Cases: every 4th has two
    slides; sites A1/B2/C3 hold about 50/30/20 % of the cases (``site`` column and barcode characters 6-7);
    at least 5 events; columns ``age`` and ``is_female`` form the ``clinical`` table.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / cohort
    (folder / "features").mkdir(parents=True, exist_ok=True)
    genes = [f"G{g:03d}" for g in range(n_genes)]

    bounds = np.cumsum(SITE_SHARES) * n_cases
    sites = [SITE_CODES[int(np.searchsorted(bounds, i, side="right"))] for i in range(n_cases)]
    ids = [case_id(cohort, s, i) for i, s in enumerate(sites)]
    times = np.round(rng.exponential(30.0, n_cases) + 0.5, 2)
    censorship = (rng.random(n_cases) < 0.4).astype(int)
    censorship[: min(MIN_EVENTS, n_cases)] = 0
    rows = []
    for i, case in enumerate(ids):
        for s in range(2 if i % 4 == 3 else 1):
            rows.append(
                {
                    "case_id": case,
                    "slide_id": f"{case}-DX{s + 1}",
                    "survival_months": times[i],
                    "censorship": censorship[i],
                    "site": sites[i],
                    "age": int(40 + i % 30),
                    "is_female": i % 2,
                }
            )
    labels = pd.DataFrame(rows)
    labels.to_csv(folder / "labels.csv", index=False)
    rna = pd.DataFrame(rng.normal(size=(n_cases, n_genes)).round(4), columns=genes)
    rna.insert(0, "case_id", ids)
    rna.to_csv(folder / "rna.csv.gz", index=False)
    if with_bags:
        gen = torch.Generator().manual_seed(seed)
        for slide in labels["slide_id"]:
            n = int(torch.randint(3, 13, (1,), generator=gen))
            torch.save(torch.randn(n, bag_dim, generator=gen), folder / "features" / f"{slide}.pt")

    (root / "groups").mkdir(exist_ok=True)
    comps = pd.DataFrame(0, index=genes, columns=[f"P{k}" for k in range(n_groups)])
    for g in range(n_genes):
        comps.iloc[g, g % n_groups] = 1
    comps.to_csv(root / "groups" / "pathways.csv", index_label="")

    manifest_path = root / MANIFEST
    keys = yaml.safe_load(manifest_path.read_text()) if manifest_path.is_file() else {}
    cohorts = [c for c in keys.get("cohorts", []) if c != cohort] + [cohort]
    keys.update(
        {
            "name": "factory",
            "cohorts": cohorts,
            "labels": "labels.csv",
            "tables": {
                "rna": {"path": "rna.csv.gz"},
                "clinical": {
                    "path": "labels.csv",
                    "columns": ["age", "is_female"],
                    "duplicates": "identical",
                },
            },
            "expression": "rna",
            "strong": "wsi" if with_bags else "clinical",
            "features": "features" if with_bags else None,
            "groups": {"path": "groups/pathways.csv", "kind": "compositions", "min_genes": 1},
            "site_column": "site",
        }
    )
    manifest_path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return DatasetLayout.load(root)
