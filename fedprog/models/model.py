"""MultimodalSurvivalModel: modality encoders -> SDIR -> CADE -> backbone fusion -> survival head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from fedprog.models.cade import CADE, TokenCADE, build_cade
from fedprog.models.encoders import BagProjector, GroupTokenizer, TabularTokenizer
from fedprog.models.registry import ModelConfig, ModelConfigError, ModelInputError
from fedprog.models.sdir import SDIR
from fedprog.models.tokens import ModalityTokens

__all__ = [
    "Fusion",
    "MultimodalSurvivalModel",
    "SurvivalHead",
    "build_multimodal",
    "check_batch",
    "reject_modules",
    "require_inputs",
    "strong_encoder",
]


class BatchLike(Protocol):
    """The fields of :class:`fedprog.data.Batch` that models read."""

    expression: Tensor  # [B, n_genes] float
    strong: Tensor  # [B, N, F] float
    strong_mask: Tensor  # [B, N] bool


class Fusion(Protocol):
    """A fusion: ``fusion(strong [B,Ns,D], weak [B,Nw,D], strong_mask [B,Ns], weak_mask) -> [B, out_dim]``.

    ``weak_mask`` [B, Nw] bool (None = all weak tokens real) comes from SDIR's token variant with
    ``mask_modalities="both"``; masked tokens must take no part in attention or pooling.
    """

    out_dim: int

    def __call__(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor, weak_mask: Tensor | None = None
    ) -> Tensor:
        """Fused representation ``[B, out_dim]``."""
        ...


def check_batch(batch: BatchLike) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(expression, strong, strong_mask)`` after checking shapes; raise :class:`ModelInputError`.

    A missing ``strong_mask`` (None) means all tokens are real. Every sample needs at least one real token.
    """
    strong = batch.strong
    if strong.dim() != 3:
        raise ModelInputError(f"batch.strong must have shape [B, N, F], got {tuple(strong.shape)}")
    mask = getattr(batch, "strong_mask", None)
    if mask is None:
        mask = torch.ones(strong.shape[:2], dtype=torch.bool, device=strong.device)
    if mask.shape != strong.shape[:2]:
        raise ModelInputError(
            f"batch.strong_mask has shape {tuple(mask.shape)}, expected {tuple(strong.shape[:2])}"
        )
    mask = mask.to(torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        names = getattr(batch, "case_ids", None)
        cases = [names[i] for i in empty] if names is not None else empty
        raise ModelInputError(f"batch.strong has no real token (empty bag) for case(s) {cases}")
    expression = batch.expression
    if expression.shape[0] != strong.shape[0]:
        raise ModelInputError(
            f"batch.expression has {expression.shape[0]} rows but batch.strong has {strong.shape[0]} samples"
        )
    return expression, strong, mask


def strong_encoder(cfg: ModelConfig, strong_kind: str, strong_dim: int) -> nn.Module:
    """The strong-modality tokenizer: :class:`BagProjector` (wsi) or :class:`TabularTokenizer` (tabular)."""
    if strong_kind == "wsi":
        return BagProjector(strong_dim, cfg.dim, cfg.projector_act, cfg.dropout)
    if strong_kind == "tabular":
        return TabularTokenizer(strong_dim, cfg.dim)
    raise ModelConfigError(f"strong_kind={strong_kind!r}; choose 'wsi' or 'tabular'")


class SurvivalHead(nn.Sequential):
    """Head ``Linear(in -> hidden) -> ReLU -> Linear(hidden -> n_outputs)`` (SurvPath: 256 -> 64 -> 4)."""

    def __init__(self, in_dim: int, hidden: int, n_outputs: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))


class MultimodalSurvivalModel(nn.Module):
    """Encoders -> SDIR -> CADE -> fusion -> head; ``forward(batch) -> [B, n_outputs]``.

    The strong modality (WSI bag or table) becomes ``[B, Ns, D]`` tokens, the expression ``[B, G, D]`` group
    tokens; SDIR and CADE (each optional) sit between the encoders and the fusion, on the encoder outputs
    before any per-token norm of a fusion. CADE is the identity in eval mode; SDIR keeps only its
    deterministic Dirac gain there (``dirac_in_eval``). The masks SDIR returns (tokens it dropped) are passed
    to CADE and the fusion, so padding and dropped tokens never contribute.

    Parameters
    ----------
    strong_encoder : nn.Module
        ``[B, N, F] -> [B, N, D]``.
    weak_encoder : GroupTokenizer
        ``[B, n_genes] -> [B, G, D]``.
    fusion : nn.Module
        See :class:`Fusion`; has ``out_dim``.
    head : nn.Module
        ``[B, out_dim] -> [B, n_outputs]``.
    sdir, cade : SDIR, CADE, optional
    """

    def __init__(
        self,
        strong_encoder: nn.Module,
        weak_encoder: GroupTokenizer,
        fusion: nn.Module,
        head: nn.Module,
        sdir: SDIR | None = None,
        cade: CADE | TokenCADE | None = None,
    ) -> None:
        super().__init__()
        self.strong_encoder = strong_encoder
        self.weak_encoder = weak_encoder
        self.sdir = sdir
        self.cade = cade
        self.fusion = fusion
        self.head = head

    def tokens(self, batch: BatchLike) -> ModalityTokens:
        """Encoded tokens after SDIR and CADE: (strong [B, Ns, D], weak [B, G, D], strong_mask, weak_mask)."""
        expression, strong, mask = check_batch(batch)
        if isinstance(self.cade, CADE):
            strong = self.cade.restyle_inputs(strong, mask)  # position=input: the WSI patch features
        tokens = ModalityTokens(self.strong_encoder(strong), self.weak_encoder(expression), mask)
        if self.sdir is not None:
            tokens = self.sdir(*tokens)
        if self.cade is not None:
            strong_tokens, weak_tokens = self.cade(*tokens)
            tokens = tokens._replace(strong=strong_tokens, weak=weak_tokens)
        return tokens

    def fused(self, batch: BatchLike) -> Tensor:
        """The fusion's representation ``[B, out_dim]`` (the input of the head)."""
        return self.fusion(*self.tokens(batch))

    def forward(self, batch: BatchLike) -> Tensor:
        """Logits ``[B, n_outputs]`` (per-bin hazard logits, or the log-risk when n_outputs = 1)."""
        return self.head(self.fused(batch))


def build_multimodal(
    cfg: ModelConfig,
    fusion: nn.Module,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> MultimodalSurvivalModel:
    """Assemble a :class:`MultimodalSurvivalModel` around ``fusion`` (encoders, modules, head: ``cfg``)."""
    require_inputs(cfg, group_index=group_index, strong_kind=strong_kind)
    check_cade_position(cfg, strong_kind)
    return MultimodalSurvivalModel(
        strong_encoder=strong_encoder(cfg, strong_kind, strong_dim),
        weak_encoder=GroupTokenizer(group_index, cfg.dim, cfg.snn_dropout),
        fusion=fusion,
        head=SurvivalHead(fusion.out_dim, cfg.head_hidden, n_outputs),
        sdir=SDIR(**cfg.sdir.kwargs()) if cfg.sdir.enabled else None,
        cade=build_cade(cfg.cade) if cfg.cade.enabled else None,
    )


def check_cade_position(cfg: ModelConfig, strong_kind: str) -> None:
    """``model.cade.position=input`` re-styles WSI patch features: refuse it on a table (one token per case,
    no style across patches) unless ``modalities`` leaves the strong modality out."""
    cade = cfg.cade
    if not (cade.enabled and cade.variant == "style" and cade.position == "input"):
        return
    if strong_kind != "wsi" and cade.modalities in ("both", "strong"):
        raise ModelConfigError(
            f"model.cade.position=input re-styles WSI patch features, but the strong modality is "
            f"{strong_kind!r}; use model.cade.position=encoded or model.cade.modalities=weak"
        )


def require_inputs(
    cfg: ModelConfig, *, group_index: Sequence[Sequence[int]] | None, strong_kind: str | None
) -> None:
    """Raise when the data lacks a modality the model reads (pass None for a modality the model ignores)."""
    if group_index is not None and not group_index:
        raise ModelConfigError(
            f"model.name={cfg.name!r} reads the expression as gene groups, but group_index is empty "
            "(the dataset has no expression table or no gene groups)"
        )
    if strong_kind is not None and strong_kind not in ("wsi", "tabular"):
        raise ModelConfigError(
            f"model.name={cfg.name!r} needs a strong modality (wsi or tabular), got "
            f"strong_kind={strong_kind!r}"
        )


def reject_modules(cfg: ModelConfig) -> None:
    """Raise for a unimodal backbone configured with SDIR/CADE (they need two modalities)."""
    enabled = [key for key in ("sdir", "cade") if getattr(cfg, key).enabled]
    if enabled:
        raise ModelConfigError(
            f"model.name={cfg.name!r} uses one modality, but model.{enabled[0]}.enabled=true: SDIR and "
            "CADE act between two modalities; use modules=none with this model"
        )
