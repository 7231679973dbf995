"""Site-owned disclosure limits: what aggregates a site agrees to send, whatever the server asks for.

The limits come from the site's own side only: the defaults of ``configs/disclosure.yaml``, then the
``disclosure:`` section of the site's federation file on its own disk (simulation), then its node config
(``min-bin-width``, ``km-max-points``, ``km-min-spacing``, ``km-min-at-risk``, ``min-cases``, ``min-events``).
A request outside them raises :class:`DisclosureRefusal` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedprog.config import config_dir, sites_dir


class DisclosureRefusal(PermissionError):
    """A site refuses a request that would disclose more than its own limits allow."""


@dataclass(frozen=True)
class DisclosurePolicy:
    """A site's disclosure limits (see ``configs/disclosure.yaml`` for each field's meaning)."""

    min_bin_width: float
    km_max_points: int
    km_min_spacing: float
    km_min_at_risk: int
    min_cases: int
    min_events: int

    @classmethod
    def load(cls, node_config: Mapping[str, Any], federation_name: str | None = None) -> DisclosurePolicy:
        """The defaults, then the federation file's ``disclosure:`` (simulation), then the node config."""
        values = dict(_defaults())
        if federation_name is not None:
            values.update(_federation_limits(federation_name))
        for name in values:
            key = name.replace("_", "-")
            if key in node_config:
                values[name] = node_config[key]
        try:
            return cls(**{f.name: f.type_cast(values[f.name]) for f in _FIELDS})  # type: ignore[attr-defined]
        except (TypeError, ValueError) as error:
            raise DisclosureRefusal(f"disclosure limits are not numbers: {error}") from error

    def check_histogram(self, step: float) -> None:
        """Refuse an event-time histogram finer than ``min_bin_width``."""
        if not step >= self.min_bin_width:
            raise DisclosureRefusal(
                f"histogram step {step:g} months is finer than this site's min-bin-width "
                f"{self.min_bin_width:g}"
            )

    def check_km_grid(self, grid: np.ndarray) -> None:
        """Refuse a KM grid of more than ``km_max_points`` points or points closer than ``km_min_spacing``."""
        if len(grid) > self.km_max_points:
            raise DisclosureRefusal(
                f"KM grid of {len(grid)} points exceeds this site's km-max-points {self.km_max_points}"
            )
        gaps = np.diff(np.sort(np.asarray(grid, dtype=float)))
        if len(gaps) and not gaps.min() >= self.km_min_spacing:
            raise DisclosureRefusal(
                f"KM grid points {gaps.min():g} months apart; this site's km-min-spacing is "
                f"{self.km_min_spacing:g}"
            )

    def check_counts(self, what: str, n_cases: int, n_events: int | None = None) -> None:
        """Refuse ``what`` over fewer than ``min_cases`` cases (or, when given, ``min_events`` events)."""
        if n_cases < self.min_cases:
            raise DisclosureRefusal(f"{what}: {n_cases} case(s) < this site's min-cases {self.min_cases}")
        if n_events is not None and n_events < self.min_events:
            raise DisclosureRefusal(f"{what}: {n_events} event(s) < this site's min-events {self.min_events}")


@dataclass(frozen=True)
class _Field:
    name: str
    type_cast: type


LIMITS = tuple(f.name for f in dataclasses.fields(DisclosurePolicy))  # the keys a site may set
_FIELDS = [_Field(f.name, float if f.type == "float" else int) for f in dataclasses.fields(DisclosurePolicy)]


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    values = OmegaConf.to_container(OmegaConf.load(config_dir() / "disclosure.yaml"), resolve=True)
    assert isinstance(values, dict)
    return values


@lru_cache(maxsize=16)
def _federation_limits(name: str) -> dict[str, Any]:
    """The ``disclosure:`` section of ``sites/federation/<name>.yaml`` (a file on the site's own disk)."""
    path = sites_dir() / "federation" / f"{name}.yaml"
    if "/" in name or "\\" in name or not path.is_file():
        return {}
    section = OmegaConf.load(path).get("disclosure") or {}
    values = OmegaConf.to_container(section, resolve=True) if section else {}
    assert isinstance(values, dict)
    unknown = sorted(set(values) - set(_defaults()))
    if unknown:
        raise DisclosureRefusal(
            f"{path.name}: unknown disclosure key(s) {unknown}; known: {sorted(_defaults())}"
        )
    return values
