"""Label-free standardization of WSI patch features: per site (``data.site_standardize``) or per bag
(``data.bag_standardize``).

Each hospital (the labels' ``site`` column) computes the per-channel mean and std of its own patch features,
over every patch of its cases that the party holding them sees (a federated site: its own cases; centralized
training: every case of the cohort), and each of its bags becomes ``(bag - mean) / std``. Only the patch
features are read, never survival times or censoring, so a held-out site standardizes itself at evaluation
time and the statistics never leave the site. A test-time normalization baseline (issue 10, item 3); it
composes with CADE, which then perturbs the standardized bags.

Per bag (``data.bag_standardize``), each case's bag is standardized by its own channel mean and std over its
patches (instance normalization of the bag): a per-channel shift and scale shared by a bag's patches, the
"style" that differs between cancers, hospitals and scanners, is removed exactly, and what the patches carry
relative to each other is kept. Nothing is shared and no label is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedprog.data.bags import read_case_bags
from fedprog.data.cohort import SITE, Cohort
from fedprog.data.errors import BagError, CohortError, preview

#: Floor of a channel's std (a constant channel is centred, not blown up).
MIN_STD = 1e-6


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and std of one site's patch features.

    Attributes
    ----------
    mean, std : Tensor
        float32, shape = (F,).
    n_patches : int
        Patches they were computed from.
    """

    mean: Tensor
    std: Tensor
    n_patches: int

    def apply(self, bag: Tensor) -> Tensor:
        """Standardize a bag, shape = (N, F), with these statistics."""
        if bag.shape[-1] != self.mean.shape[0]:
            raise BagError(
                f"site standardization: bag width {bag.shape[-1]} differs from the site statistics' "
                f"{self.mean.shape[0]}"
            )
        return (bag - self.mean) / self.std


def channel_stats(cohort: Cohort, case_ids: Sequence[str]) -> ChannelStats:
    """Per-channel mean and (population) std over every patch of every bag of ``case_ids``."""
    sums: Tensor | None = None
    squares: Tensor | None = None
    n = 0
    for case in case_ids:
        bag = read_case_bags(
            cohort.bag_paths[case], case_id=case, cohort=cohort.name, min_patches=cohort.layout.min_patches
        ).to(torch.float64)
        if sums is None or squares is None:
            sums, squares = bag.sum(0), (bag**2).sum(0)
        elif bag.shape[1] != sums.shape[0]:
            raise BagError(
                f"cohort {cohort.name!r}, case {case}: bag width {bag.shape[1]} differs from {sums.shape[0]}"
            )
        else:
            sums, squares = sums + bag.sum(0), squares + (bag**2).sum(0)
        n += int(bag.shape[0])
    if sums is None or squares is None:
        raise CohortError(f"cohort {cohort.name!r}: site standardization needs at least one case")
    mean = sums / n
    std = (squares / n - mean**2).clamp_min(0.0).sqrt().clamp_min(MIN_STD)
    return ChannelStats(mean.to(torch.float32), std.to(torch.float32), n)


def site_standardizers(
    cohort: Cohort, case_ids: Sequence[str], pool: Sequence[str]
) -> dict[str, ChannelStats]:
    """Case id -> the statistics of its hospital (``site`` column) over that hospital's ``pool`` cases.

    ``pool`` is every case the site holds (labelled or not, train or test); it must contain ``case_ids``.
    """
    outside = sorted(set(case_ids) - set(pool))
    if outside:
        raise CohortError(
            f"cohort {cohort.name!r}: the site standardization pool lacks dataset case(s) {preview(outside)}"
        )
    pool = list(dict.fromkeys(pool))
    sites = cohort.labels[SITE].astype(str)
    needed = set(sites.loc[list(case_ids)])
    by_site: Mapping[str, ChannelStats] = {
        site: channel_stats(cohort, [c for c in pool if sites.loc[c] == site]) for site in sorted(needed)
    }
    return {case: by_site[sites.loc[case]] for case in case_ids}


def standardize_bag(bag: Tensor) -> Tensor:
    """A bag, shape = (N, F), standardized by its own channel mean and (population) std over its N patches.

    Invariant to any per-channel affine map of the bag with positive scale (the bag's style); a channel that
    is constant over the bag becomes 0.
    """
    wide = bag.to(torch.float64)
    mean = wide.mean(0)
    std = wide.std(0, correction=0).clamp_min(MIN_STD)
    return ((wide - mean) / std).to(bag.dtype)
