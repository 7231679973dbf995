"""Backbone registry: typed model config, ``register_backbone``, ``create_model`` and ``list_models``."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "CADEConfig",
    "ModelConfig",
    "ModelConfigError",
    "ModelInputError",
    "SDIRConfig",
    "create_model",
    "list_models",
    "register_backbone",
]


class ModelConfigError(ValueError):
    """A model setting is unknown, out of range or inconsistent; the message names the ``model.*`` key."""


class ModelInputError(ValueError):
    """A batch does not fit the model (shape, feature count, empty bag); the message names the tensor."""


def _from_mapping(cls: type, cfg: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    values = dict(cfg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelConfigError(f"{prefix}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return values


@dataclass(frozen=True)
class SDIRConfig:
    """``model.sdir``: Sparse Dirac Information Rebalancer (see :class:`fedprog.models.sdir.SDIR`).

    Defaults: the modality variant (issue 10) suppressing the strong modality with p = 0.5, the Dirac gain
    (gamma = 1, eps = 1) in training and evaluation; ``variant="token"`` is paper_spec Part A's token drop.
    """

    enabled: bool = False
    variant: str = "modality"
    p: float = 0.5
    dominant: str = "strong"
    mask_modalities: str = "strong"
    rescale: bool = False
    gamma: float = 1.0
    eps: float = 1.0
    stat_eps: float = 1e-6
    dirac_in_eval: bool = True
    adaptive: bool = False
    p_min: float = 0.1
    p_max: float = 0.9

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`~fedprog.models.sdir.SDIR` (everything but ``enabled``)."""
        return {k: v for k, v in asdict(self).items() if k != "enabled"}


@dataclass(frozen=True)
class CADEConfig:
    """``model.cade``: Cancer-aware Distribution Entanglement (see :mod:`fedprog.models.cade`).

    ``variant="style"`` (default): per-channel bag statistics mixed with other patients' (batch, running bank,
    external bank); ``variant="token"``: paper_spec Part A's per-token cross-modal mixing (``partner``,
    ``bandwidth``). Shared: p_aug = 0.3, alpha = 0.1 (official code), the linear path, eps = 1e-6.
    """

    enabled: bool = False
    variant: str = "style"
    p_aug: float = 0.3
    alpha: float = 0.1
    path: str = "linear"
    eps: float = 1e-6
    mode: str = "mix"
    modalities: str = "both"
    bank_size: int = 64
    external_prob: float = 0.5
    dsu_scale: float = 1.0
    summary_min_count: int = 10
    position: str = "encoded"
    partner: str = "kernel"
    bandwidth: float | str = "median"


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` config group (``configs/model/<name>.yaml``); unknown keys raise.

    Attributes
    ----------
    name : registered backbone name.
    dim : token width D of both modalities (SurvPath: 256).
    dropout : dropout of the fusion layers (SurvPath feed-forward: 0.1).
    snn_dropout : AlphaDropout of the self-normalizing gene-group networks (SurvPath: 0.25).
    projector_act : ``none`` (SurvPath: a plain Linear) or ``relu`` (MCAT/ABMIL: Linear -> ReLU -> Dropout).
    attn_dim : SurvPath's single-head attention width (dim_head, 128); its pooled output is 2 * attn_dim.
    head_hidden : hidden width of the prediction head (SurvPath: 64).
    pool_hidden : hidden width of the gated attention-MIL pooling (Ilse et al.).
    coattn_heads : MCAT co-attention heads (1).
    transformer_layers, transformer_heads, transformer_ff : MCAT's per-modality transformers (2, 8, 512).
    weak_pool : pooling of the group tokens in ``late_fusion`` and ``snn`` (``mean`` or ``abmil``).
    snn_input : ``snn`` over all grouped ``genes`` or over the ``groups`` tokens.
    snn_layers : number of Linear -> ELU -> AlphaDropout blocks of the gene-level SNN.
    pathway_scores : ``linear_cox`` also reads the expression, as one score per gene group (the mean of its
        standardized genes) beside the tabular features.
    sdir, cade : the two plug-in modules.
    """

    name: str
    dim: int = 256
    dropout: float = 0.1
    snn_dropout: float = 0.25
    projector_act: str = "none"
    attn_dim: int = 128
    head_hidden: int = 64
    pool_hidden: int = 128
    coattn_heads: int = 1
    transformer_layers: int = 2
    transformer_heads: int = 8
    transformer_ff: int = 512
    weak_pool: str = "mean"
    snn_input: str = "genes"
    snn_layers: int = 2
    pathway_scores: bool = False
    sdir: SDIRConfig = field(default_factory=SDIRConfig)
    cade: CADEConfig = field(default_factory=CADEConfig)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | ModelConfig) -> ModelConfig:
        """Build from a (Hydra) mapping; unknown keys raise :class:`ModelConfigError` naming them."""
        if isinstance(cfg, ModelConfig):
            return cfg
        values = _from_mapping(cls, _plain(cfg), "model")
        if "name" not in values:
            raise ModelConfigError(f"model: missing key 'name'; registered models: {list_models()}")
        values["sdir"] = SDIRConfig(**_from_mapping(SDIRConfig, values.get("sdir") or {}, "model.sdir"))
        values["cade"] = CADEConfig(**_from_mapping(CADEConfig, values.get("cade") or {}, "model.cade"))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the first out-of-range key."""
        for key in ("dim", "attn_dim", "head_hidden", "pool_hidden", "coattn_heads", "transformer_heads"):
            if getattr(self, key) < 1:
                raise ModelConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        for key in ("dropout", "snn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ModelConfigError(f"model.{key}={getattr(self, key)} must lie in [0, 1)")
        choices = {
            "projector_act": ("none", "relu"),
            "weak_pool": ("mean", "abmil"),
            "snn_input": ("genes", "groups"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ModelConfigError(f"model.{key}={getattr(self, key)!r}; choose one of {list(allowed)}")
        if self.dim % self.coattn_heads or self.dim % self.transformer_heads:
            raise ModelConfigError(
                f"model.dim={self.dim} must be divisible by model.coattn_heads={self.coattn_heads} and "
                f"model.transformer_heads={self.transformer_heads}"
            )


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve an OmegaConf node (or any mapping) to plain Python containers."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core, a hard dependency
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


#: Signature of a backbone builder: ``builder(cfg, *, group_index, strong_kind, strong_dim, n_outputs)``.
Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
#: Strong-modality kinds: a WSI bag, a table as [B, F, 1] tokens, or none (expression-only data: ``snn``).
STRONG_KINDS = ("wsi", "tabular", "none")


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name`` (``model.name`` in the config).

    The builder is called as ``builder(cfg: ModelConfig, *, group_index, strong_kind, strong_dim, n_outputs)``
    and returns a module whose ``forward(batch)`` gives ``[B, n_outputs]``.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelConfigError(
                f"model name {name!r} is already registered by {_REGISTRY[name].__module__}"
            )
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell-style wildcard (``"*fusion"``)."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(
    model_cfg: Mapping[str, Any] | ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
    n_genes_per_group: Sequence[int] | None = None,
    announce: bool = True,
) -> nn.Module:
    """Build the model named by ``model_cfg.name``.

    Parameters
    ----------
    model_cfg : mapping or ModelConfig
        The ``model`` config group (``name``, ``dim``, ..., ``sdir``, ``cade``).
    group_index : list of list of int
        For each gene group, the column positions of its genes in ``batch.expression``; may be empty for
        models that do not read the expression (``abmil``, ``linear_cox``).
    strong_kind : {"wsi", "tabular", "none"}
        The strong modality: a WSI bag ``[B, N, F]``, a table given as ``[B, F, 1]``, or none (only for
        expression-only models).
    strong_dim : int
        ``F``: the patch-feature width (wsi) or the number of tabular features (tabular).
    n_outputs : int
        Number of time bins (NLL loss), or 1 for a log-risk output (Cox loss).
    n_genes_per_group : list of int, optional
        Checked against ``group_index`` when given (architecture.md signature).
    announce : bool, default: True
        Log the model's name and parameter count (off for a build that only checks a config).

    Returns
    -------
    nn.Module
        ``model(batch) -> Tensor [B, n_outputs]``; ``train()`` enables SDIR/CADE, ``eval()`` turns them
        into the identity.
    """
    cfg = ModelConfig.from_cfg(model_cfg)
    if cfg.name not in _REGISTRY:
        raise ModelConfigError(f"unknown model.name={cfg.name!r}; registered models: {list_models()}")
    if strong_kind not in STRONG_KINDS:
        raise ModelConfigError(f"strong_kind={strong_kind!r}; choose one of {list(STRONG_KINDS)}")
    if strong_dim < 1 or n_outputs < 1:
        raise ModelConfigError(f"strong_dim={strong_dim} and n_outputs={n_outputs} must both be >= 1")
    groups = [list(map(int, g)) for g in group_index]
    empty = [i for i, g in enumerate(groups) if not g]
    if empty:
        raise ModelConfigError(
            f"group_index must list at least one gene per group; empty groups at {empty[:10]}"
        )
    if n_genes_per_group is not None and list(n_genes_per_group) != [len(g) for g in groups]:
        raise ModelConfigError("n_genes_per_group does not match the group sizes of group_index")
    model = _REGISTRY[cfg.name](
        cfg, group_index=groups, strong_kind=strong_kind, strong_dim=int(strong_dim), n_outputs=int(n_outputs)
    )
    if announce:
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "created model %s (%s strong, %d outputs): %d parameters",
            cfg.name,
            strong_kind,
            n_outputs,
            n_params,
        )
    return model
