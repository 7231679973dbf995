"""Settings of the ``privacy`` config group: typed dataclasses, :func:`parse_privacy`, and the errors.

Three modes, chosen by the Hydra group ``privacy`` (``configs/privacy/*.yaml``, key ``privacy.mode``):
``central_dp`` (:mod:`.central`), ``local_dp`` (:mod:`.local`) and ``secagg`` (:mod:`.secagg`); ``none``
applies no mechanism. Every ``privacy.*`` key is validated here, and errors name the dotted key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from fedprog.config import to_run_config

MODES = ("none", "central_dp", "local_dp", "secagg")
CLIPPING_SIDES = ("server", "client")
PREFIX = "privacy"
KEY_NUM_EXAMPLES = "num-examples"


class PrivacyConfigError(ValueError):
    """A ``privacy.*`` setting is missing, unknown, or out of range; the message names the key."""


class SecAggError(RuntimeError):
    """SecAgg+ cannot run or aggregate correctly (site weight or parameter out of range, failed rounds)."""


@dataclass(frozen=True)
class CentralDpSettings:
    """``privacy.central_dp``: DP-FedAvg with Flower's clipping wrappers (see ``configs/privacy``)."""

    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    clipping: str = "server"
    adaptive: bool = False
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    accounting: bool = True
    target_delta: float = 1e-5
    max_epsilon: float | None = None


@dataclass(frozen=True)
class LocalDpSettings:
    """``privacy.local_dp``: arguments of Flower's ``LocalDpMod``."""

    clipping_norm: float = 1.0
    sensitivity: float = 1.0
    epsilon: float = 1.0
    delta: float = 1e-5


@dataclass(frozen=True)
class SecAggSettings:
    """``privacy.secagg``: arguments of Flower's ``SecAggPlusWorkflow`` plus run controls."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.7
    max_weight: float = 1000.0
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    modulus_range: int = 4294967296
    timeout: float | None = None
    min_nodes: int = 2
    strict: bool = True


@dataclass(frozen=True)
class PrivacySettings:
    """Validated ``privacy`` config: the mode and the settings of that mode (``None`` for the others)."""

    mode: str = "none"
    central_dp: CentralDpSettings | None = None
    local_dp: LocalDpSettings | None = None
    secagg: SecAggSettings | None = None

    def to_config(self) -> dict[str, Any]:
        """Return the nested ``privacy`` mapping of this mode (the inverse of :func:`parse_privacy`)."""
        section = getattr(self, self.mode, None)
        return {"mode": self.mode, **({self.mode: asdict(section)} if section is not None else {})}

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flatten to ``privacy.*`` scalar keys for a Flower ``ConfigRecord`` (``None`` as ``json:null``)."""
        return to_run_config({PREFIX: self.to_config()})


_SECTIONS: dict[str, type] = {
    "central_dp": CentralDpSettings,
    "local_dp": LocalDpSettings,
    "secagg": SecAggSettings,
}


def _as_mapping(cfg: DictConfig | Mapping[str, Any] | PrivacySettings | None) -> dict[str, Any]:
    if cfg is None:
        return {"mode": "none"}
    if isinstance(cfg, PrivacySettings):
        return cfg.to_config()
    if isinstance(cfg, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def _number(key: str, value: Any, *, integer: bool = False, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        expected = "an integer" if integer else "a finite number"
        raise PrivacyConfigError(f"{key}: expected {expected}{' or null' if optional else ''}, got {value!r}")
    return value if integer else float(value)


def _check(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise PrivacyConfigError(f"{key}: expected {expected}, got {value!r}")


def _section(mode: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the keys of one section against its dataclass and fill the documented defaults."""
    cls = _SECTIONS[mode]
    known = {f.name: f for f in fields(cls)}
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PrivacyConfigError(
            f"{PREFIX}.{mode}.{unknown[0]}: unknown key (known keys of {PREFIX}.{mode}: {sorted(known)})"
        )
    return {name: raw.get(name, f.default) for name, f in known.items()}


def _parse_central(values: dict[str, Any]) -> CentralDpSettings:
    k = f"{PREFIX}.central_dp."
    z = _number(k + "noise_multiplier", values["noise_multiplier"])
    norm = _number(k + "clipping_norm", values["clipping_norm"])
    quantile = _number(k + "target_clipped_quantile", values["target_clipped_quantile"])
    lr = _number(k + "clip_norm_lr", values["clip_norm_lr"])
    count_std = _number(k + "clipped_count_stddev", values["clipped_count_stddev"], optional=True)
    delta = _number(k + "target_delta", values["target_delta"])
    max_eps = _number(k + "max_epsilon", values["max_epsilon"], optional=True)
    _check(k + "noise_multiplier", z >= 0, ">= 0", z)
    _check(k + "clipping_norm", norm > 0, "> 0", norm)
    _check(
        k + "clipping", values["clipping"] in CLIPPING_SIDES, f"one of {CLIPPING_SIDES}", values["clipping"]
    )
    for name in ("adaptive", "accounting"):
        _check(k + name, isinstance(values[name], bool), "true or false", values[name])
    _check(k + "target_clipped_quantile", 0 <= quantile <= 1, "a value in [0, 1]", quantile)
    _check(k + "clip_norm_lr", lr > 0, "> 0", lr)
    _check(k + "clipped_count_stddev", count_std is None or count_std >= 0, ">= 0 or null", count_std)
    _check(k + "target_delta", 0 < delta < 1, "a value in (0, 1)", delta)
    _check(k + "max_epsilon", max_eps is None or max_eps > 0, "> 0 or null", max_eps)
    _check(k + "noise_multiplier", z > 0 or not values["accounting"], "> 0 when accounting is on", z)
    return CentralDpSettings(
        noise_multiplier=z,
        clipping_norm=norm,
        clipping=values["clipping"],
        adaptive=values["adaptive"],
        target_clipped_quantile=quantile,
        clip_norm_lr=lr,
        clipped_count_stddev=count_std,
        accounting=values["accounting"],
        target_delta=delta,
        max_epsilon=max_eps,
    )


def _parse_local(values: dict[str, Any]) -> LocalDpSettings:
    k = f"{PREFIX}.local_dp."
    parsed = {name: _number(k + name, values[name]) for name in values}
    _check(k + "clipping_norm", parsed["clipping_norm"] > 0, "> 0", parsed["clipping_norm"])
    _check(k + "sensitivity", parsed["sensitivity"] > 0, "> 0", parsed["sensitivity"])
    _check(k + "epsilon", parsed["epsilon"] > 0, "> 0", parsed["epsilon"])
    _check(k + "delta", 0 < parsed["delta"] < 1, "a value in (0, 1)", parsed["delta"])
    return LocalDpSettings(**parsed)


def _parse_share(key: str, value: Any, int_minimum: int) -> int | float:
    if isinstance(value, int) and not isinstance(value, bool):
        _check(key, value >= int_minimum, f"an integer >= {int_minimum} or a fraction in (0, 1]", value)
        return value
    fraction = _number(key, value)
    _check(key, 0 < fraction <= 1, f"an integer >= {int_minimum} or a fraction in (0, 1]", value)
    return fraction


def _parse_secagg(values: dict[str, Any]) -> SecAggSettings:
    k = f"{PREFIX}.secagg."
    shares = _parse_share(k + "num_shares", values["num_shares"], 3)
    threshold = _parse_share(k + "reconstruction_threshold", values["reconstruction_threshold"], 2)
    if isinstance(shares, int) and isinstance(threshold, int):
        _check(k + "reconstruction_threshold", threshold < shares, f"< num_shares ({shares})", threshold)
    max_weight = _number(k + "max_weight", values["max_weight"])
    clip = _number(k + "clipping_range", values["clipping_range"])
    q_range = _number(k + "quantization_range", values["quantization_range"], integer=True)
    m_range = _number(k + "modulus_range", values["modulus_range"], integer=True)
    timeout = _number(k + "timeout", values["timeout"], optional=True)
    min_nodes = _number(k + "min_nodes", values["min_nodes"], integer=True)
    _check(k + "max_weight", max_weight > 0, "> 0", max_weight)
    _check(k + "clipping_range", clip > 0, "> 0", clip)
    _check(k + "quantization_range", q_range > 0, "> 0", q_range)
    _check(k + "modulus_range", m_range > q_range and m_range & (m_range - 1) == 0,
           f"a power of 2 larger than quantization_range ({q_range})", m_range)  # fmt: skip
    _check(k + "modulus_range", m_range <= 2**32, "<= 2**32 (Flower masks with uint32)", m_range)
    _check(k + "timeout", timeout is None or timeout > 0, "> 0 or null", timeout)
    _check(k + "min_nodes", min_nodes >= 2, ">= 2 (SecAgg+ needs two sites)", min_nodes)
    _check(k + "strict", isinstance(values["strict"], bool), "true or false", values["strict"])
    return SecAggSettings(
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=max_weight,
        clipping_range=clip,
        quantization_range=q_range,
        modulus_range=m_range,
        timeout=timeout,
        min_nodes=min_nodes,
        strict=values["strict"],
    )


def parse_privacy(cfg: DictConfig | Mapping[str, Any] | PrivacySettings | None) -> PrivacySettings:
    """Validate the ``privacy`` config group and return typed settings.

    Parameters
    ----------
    cfg : DictConfig or Mapping or PrivacySettings or None
        ``cfg.privacy``: ``mode`` plus the section of that mode (``central_dp``, ``local_dp`` or ``secagg``).
        Missing keys take the defaults documented in ``configs/privacy/<mode>.yaml``; ``None`` means no
        privacy mechanism.

    Returns
    -------
    PrivacySettings
        The mode and its validated section.

    Raises
    ------
    PrivacyConfigError
        A key is unknown, has the wrong type or is out of range; the message starts with the dotted key,
        e.g. ``privacy.central_dp.noise_multiplier: expected >= 0, got -1.0``.
    """
    if isinstance(cfg, PrivacySettings):
        return cfg
    raw = _as_mapping(cfg)
    allowed = {"mode", *_SECTIONS}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PrivacyConfigError(f"{PREFIX}.{unknown[0]}: unknown key (known keys: {sorted(allowed)})")
    mode = raw.get("mode", "none")
    _check(f"{PREFIX}.mode", mode in MODES, f"one of {MODES}", mode)
    if mode == "none":
        return PrivacySettings()
    values = _section(mode, raw.get(mode))
    parser = {"central_dp": _parse_central, "local_dp": _parse_local, "secagg": _parse_secagg}[mode]
    return PrivacySettings(mode=mode, **{mode: parser(values)})
