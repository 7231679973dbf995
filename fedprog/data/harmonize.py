"""Gene harmonization in one place: the training sites fix the features, every other site is aligned to them.

Used by every path (``fedprog train``, ``strategy=pooled|local``, the federated server and clients).

Rule (``gene_policy`` of the data layout)
-----------------------------------------
``intersection`` (default)
    The feature genes are those every TRAINING site has, in the first training site's column order.
``union``
    Every gene of any training site (first site's order, then the others' new genes in their order); a
    training site lacking a gene is imputed like a held-out site (see below), so the transform's per-gene
    moments count only the sites that measured it.
``strict``
    The training sites must have identical gene sets, and no other site may lack one of them.

Sites that are not used to fix the features (held-out sites, targets, a site of another cohort) are aligned
to the feature list: extra genes are ignored; a missing gene is imputed at the TRAINING mean, i.e. exactly 0
after ``clip_standardize`` standardization (``ExpressionTransform.transform(..., impute_missing=True)``). The
number of genes each site lacks is logged and reported (``SurvivalDataset.missing_genes``). A site lacking
more than ``max_missing_genes_fraction`` of the feature genes (default 0.1; 0 under ``strict``) is refused
with a one-line :class:`GeneMismatchError` naming the site and the count. Nothing depends on which other
cohorts sit in the data folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from fedprog.data.errors import GeneMismatchError, preview

log = logging.getLogger(__name__)

GENE_POLICIES = ("intersection", "union", "strict")
DEFAULT_MAX_MISSING_GENES_FRACTION = 0.1


def feature_genes(gene_lists: Mapping[str, Sequence[str]], policy: str = "intersection") -> list[str]:
    """The expression genes fixed by the training sites under ``policy`` (see the module docstring).

    Parameters
    ----------
    gene_lists : mapping of site (or cohort) name to its expression genes
        The TRAINING sites only, in a stable order (the first one fixes the column order).
    policy : {"intersection", "union", "strict"}

    Raises
    ------
    GeneMismatchError
        ``strict`` with differing gene sets, or an empty result; the message names the sites and counts.
    """
    if policy not in GENE_POLICIES:
        raise GeneMismatchError(f"gene_policy={policy!r} is not one of {list(GENE_POLICIES)}")
    if not gene_lists:
        return []
    lists = {name: [str(g) for g in genes] for name, genes in gene_lists.items()}
    first = next(iter(lists.values()))
    common = set.intersection(*(set(g) for g in lists.values()))
    if policy == "union":
        genes = list(dict.fromkeys(g for genes in lists.values() for g in genes))
    else:
        genes = [g for g in first if g in common]
    union = set().union(*(set(g) for g in lists.values()))
    if len(common) != len(union):
        detail = "; ".join(
            f"{name} lacks {len(union - set(g))} (e.g. {preview(sorted(union - set(g)), 3)})"
            for name, g in lists.items()
            if len(union - set(g))
        )
        message = f"training sites' expression genes differ: {len(common)} shared of {len(union)}; {detail}"
        if policy == "strict":
            raise GeneMismatchError(f"{message} (gene_policy=strict)")
        log.warning("%s; gene_policy=%s keeps %d genes", message, policy, len(genes))
    if not genes:
        raise GeneMismatchError(f"training sites {sorted(lists)} share no expression gene")
    return genes


def max_missing_fraction(layout: object) -> float:
    """The layout's ``max_missing_genes_fraction`` (0 under ``gene_policy: strict``)."""
    if getattr(layout, "gene_policy", "intersection") == "strict":
        return 0.0
    return float(getattr(layout, "max_missing_genes_fraction", DEFAULT_MAX_MISSING_GENES_FRACTION))


def missing_genes(
    site: str, available: Iterable[str], genes: Sequence[str], max_fraction: float
) -> list[str]:
    """The feature ``genes`` a site lacks; refuse (one line naming site and count) above ``max_fraction``.

    Parameters
    ----------
    site : str
        Site (or cohort) name for the message.
    available : iterable of str
        The site's expression genes.
    genes : sequence of str
        The feature genes fixed by the training sites.
    max_fraction : float
        Largest allowed fraction of missing genes (0: none may be missing).
    """
    have = set(map(str, available))
    lacking = [g for g in genes if g not in have]
    if not lacking:
        return []
    fraction = len(lacking) / max(len(genes), 1)
    if fraction > max_fraction:
        raise GeneMismatchError(
            f"site {site!r} lacks {len(lacking)} of the {len(genes)} training genes ({fraction:.1%} > "
            f"max_missing_genes_fraction={max_fraction:g}): {preview(lacking)}"
        )
    log.warning(
        "site %s lacks %d of the %d training genes (imputed at the training mean): %s",
        site,
        len(lacking),
        len(genes),
        preview(lacking),
    )
    return lacking


def align_expression(frame: pd.DataFrame, genes: Sequence[str]) -> pd.DataFrame:
    """``frame`` with exactly the columns ``genes`` (missing genes as all-NaN columns, extra ones dropped)."""
    return frame.reindex(columns=list(genes))
