"""Unimodal baselines: ``snn`` (expression only), ``abmil`` (strong only), ``linear_cox`` (FLamby)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedprog.data.groups import group_means
from fedprog.models.encoders import GatedAttentionPool, GroupTokenizer, SNNBlock
from fedprog.models.late_fusion import WeakPool
from fedprog.models.model import (
    BatchLike,
    SurvivalHead,
    check_batch,
    reject_modules,
    require_inputs,
    strong_encoder,
)
from fedprog.models.registry import ModelConfig, ModelConfigError, ModelInputError, register_backbone

__all__ = ["ABMILModel", "LinearCoxModel", "SNNModel"]


class SNNModel(nn.Module):
    """Self-normalizing network on the expression only (Klambauer et al.; MCAT's SNN baseline).

    ``snn_input="genes"``: the union of the grouped genes -> ``snn_layers`` x (Linear -> ELU -> AlphaDropout)
    -> head. ``snn_input="groups"``: one SNN per gene group (:class:`GroupTokenizer`) -> pooled -> head.
    """

    def __init__(self, cfg: ModelConfig, group_index: Sequence[Sequence[int]], n_outputs: int) -> None:
        super().__init__()
        self.mode = cfg.snn_input
        if self.mode == "genes":
            genes = sorted({int(i) for group in group_index for i in group})
            self.register_buffer("genes", torch.as_tensor(genes, dtype=torch.long), persistent=False)
            widths = [len(genes)] + [cfg.dim] * max(1, cfg.snn_layers)
            self.encoder: nn.Module = nn.Sequential(
                *(SNNBlock(a, b, cfg.snn_dropout) for a, b in zip(widths[:-1], widths[1:], strict=True))
            )
            self.pool = None
        else:
            self.encoder = GroupTokenizer(group_index, cfg.dim, cfg.snn_dropout)
            self.pool = WeakPool(cfg.weak_pool, cfg.dim, cfg.pool_hidden, cfg.dropout)
        self.head = SurvivalHead(cfg.dim, cfg.head_hidden, n_outputs)

    def forward(self, batch: BatchLike) -> Tensor:
        """Logits [B, n_outputs] from ``batch.expression`` [B, n_genes]; the strong modality is ignored."""
        expression = batch.expression
        if self.pool is None:
            if expression.dim() != 2 or expression.shape[1] <= int(self.genes.max()):
                raise ModelInputError(
                    f"batch.expression has shape {tuple(expression.shape)}; the gene groups need "
                    f"[B, >= {int(self.genes.max()) + 1}]"
                )
            return self.head(self.encoder(expression[:, self.genes]))
        return self.head(self.pool(self.encoder(expression)))


class ABMILModel(nn.Module):
    """Gated attention-MIL on the strong modality only (Ilse et al. 2018): tokens -> masked ABMIL -> head."""

    def __init__(self, cfg: ModelConfig, strong_kind: str, strong_dim: int, n_outputs: int) -> None:
        super().__init__()
        self.encoder = strong_encoder(cfg, strong_kind, strong_dim)
        self.pool = GatedAttentionPool(cfg.dim, cfg.pool_hidden, cfg.dropout)
        self.head = SurvivalHead(cfg.dim, cfg.head_hidden, n_outputs)

    def forward(self, batch: BatchLike) -> Tensor:
        """Logits [B, n_outputs] from ``batch.strong`` [B, N, F] and ``batch.strong_mask`` [B, N]."""
        _, strong, mask = check_batch(batch)
        pooled, _ = self.pool(self.encoder(strong), mask)
        return self.head(pooled)


class LinearCoxModel(nn.Module):
    """Linear Cox model: one ``Linear(F [+ G] -> 1)``; output = log-risk.

    Over the tabular features (FLamby's Fed-TCGA-BRCA model) and, given ``group_index`` (``model.
    pathway_scores``), over one score per gene group beside them: the mean of the group's standardized genes
    in ``batch.expression`` (the features of the multi-source Coxnet's ``clinical_pathways``).
    """

    def __init__(self, n_features: int, group_index: Sequence[Sequence[int]] = ()) -> None:
        super().__init__()
        self.n_features = n_features
        self.n_genes = 1 + max((int(i) for group in group_index for i in group), default=-1)
        averaging = torch.as_tensor(group_means(group_index, self.n_genes), dtype=torch.float32)
        self.register_buffer("averaging", averaging, persistent=False)
        self.linear = nn.Linear(n_features + len(group_index), 1)

    def forward(self, batch: BatchLike) -> Tensor:
        """Log-risk [B, 1] from tabular ``batch.strong`` [B, F, 1] (and ``batch.expression`` [B, n_genes])."""
        table = batch.strong
        if table.dim() != 3 or table.shape[1:] != (self.n_features, 1):
            raise ModelInputError(
                f"linear_cox needs tabular batch.strong of shape [B, {self.n_features}, 1], "
                f"got {tuple(table.shape)}"
            )
        features = table[..., 0]
        if self.averaging.shape[0]:
            expression = batch.expression
            if expression is None or expression.dim() != 2 or expression.shape[1] < self.n_genes:
                shape = None if expression is None else tuple(expression.shape)
                raise ModelInputError(
                    f"linear_cox with pathway_scores needs batch.expression [B, >= {self.n_genes}], "
                    f"got {shape}"
                )
            scores = expression[:, : self.n_genes].to(features.dtype) @ self.averaging.T
            features = torch.cat([features, scores], dim=1)
        return self.linear(features)


@register_backbone("snn")
def snn(
    cfg: ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> SNNModel:
    """Expression-only SNN (``model.snn_input``: genes | groups); any ``strong_kind``, including none."""
    reject_modules(cfg)
    require_inputs(cfg, group_index=group_index, strong_kind=None)
    return SNNModel(cfg, group_index, n_outputs)


@register_backbone("abmil")
def abmil(
    cfg: ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> ABMILModel:
    """Strong-modality-only attention MIL (WSI bag or tabular tokens); ``group_index`` may be empty."""
    reject_modules(cfg)
    require_inputs(cfg, group_index=None, strong_kind=strong_kind)
    return ABMILModel(cfg, strong_kind, strong_dim, n_outputs)


@register_backbone("linear_cox")
def linear_cox(
    cfg: ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> LinearCoxModel:
    """Linear Cox model on a tabular strong modality (and, with ``model.pathway_scores``, one score per gene
    group); ``n_outputs=1`` (train with ``training.loss=cox``)."""
    reject_modules(cfg)
    if cfg.pathway_scores and not group_index:
        raise ModelConfigError(
            "model.pathway_scores=true needs gene groups (data.expression and data.groups)"
        )
    if strong_kind != "tabular":
        raise ModelConfigError(
            f"model.name='linear_cox' needs a tabular strong modality, got strong_kind={strong_kind!r}"
        )
    if n_outputs != 1:
        raise ModelConfigError(
            f"model.name='linear_cox' outputs one log-risk, got n_outputs={n_outputs}; use training.loss=cox"
        )
    return LinearCoxModel(strong_dim, group_index if cfg.pathway_scores else ())
