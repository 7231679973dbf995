"""Exception classes of the data layer: every message names the culprit (file, column, case, site)."""

from __future__ import annotations


class CohortError(ValueError):
    """Any data problem; the message names the file, column, case and/or site at fault."""


class LayoutError(CohortError):
    """The dataset layout (manifest or Hydra ``data`` config) is invalid or inconsistent."""


class MissingColumnError(CohortError):
    """A required column is absent from a table."""


class InvalidValueError(CohortError):
    """A value is non-numeric, NaN, infinite or outside its allowed range."""


class DuplicateCaseError(CohortError):
    """A case id (or a (case, slide) pair) occurs more than once where it must be unique."""


class MissingFeaturesError(CohortError):
    """Cases have labels but no features (no table row, no bag file), or none is left after dropping."""


class BagError(CohortError):
    """A WSI bag file is unreadable, empty, or has a feature dimension that differs from the others."""


class GeneMismatchError(CohortError):
    """Gene sets differ between cohorts or sites, or a transform is applied to a table lacking its genes."""


class GroupError(CohortError):
    """A gene-group definition is malformed or names no gene of the expression table."""


class SiteError(CohortError):
    """A site partition is invalid: unknown held-out name, unreadable mapping, empty site."""


def preview(items: object, limit: int = 5) -> str:
    """Return ``a, b, c (+N more)`` for the first ``limit`` items of an iterable, for error messages."""
    values = [str(item) for item in items]  # type: ignore[attr-defined]
    head = ", ".join(values[:limit])
    return head if len(values) <= limit else f"{head} (+{len(values) - limit} more)"
