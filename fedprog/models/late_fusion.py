"""Late-fusion backbone: attention-MIL pooling of the strong tokens, pooled group tokens, concatenated."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedprog.models.encoders import GatedAttentionPool, masked_mean
from fedprog.models.model import MultimodalSurvivalModel, build_multimodal
from fedprog.models.registry import ModelConfig, register_backbone

__all__ = ["LateFusion", "WeakPool"]


class WeakPool(nn.Module):
    """Pool group tokens [B, G, D] -> [B, D] by their ``mean`` or gated attention (``abmil``)."""

    def __init__(self, kind: str, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attention = GatedAttentionPool(dim, hidden, dropout) if kind == "abmil" else None

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pooled group representation [B, D] over the real tokens (``mask`` [B, G], None = all)."""
        if self.attention is None:
            return masked_mean(tokens, mask)
        return self.attention(tokens, mask)[0]


class LateFusion(nn.Module):
    """``concat(ABMIL(strong tokens, mask), pool(group tokens))`` -> ``[B, 2 D]``; no cross-attention."""

    def __init__(self, dim: int, pool_hidden: int, weak_pool: str, dropout: float) -> None:
        super().__init__()
        self.strong_pool = GatedAttentionPool(dim, pool_hidden, dropout)
        self.weak_pool = WeakPool(weak_pool, dim, pool_hidden, dropout)
        self.out_dim = 2 * dim

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor, weak_mask: Tensor | None = None
    ) -> Tensor:
        """Fuse ``strong`` [B, Ns, D] and ``weak`` [B, G, D] (each pooled over real tokens) -> [B, 2 D]."""
        pooled_strong, _ = self.strong_pool(strong, strong_mask)
        return torch.cat([pooled_strong, self.weak_pool(weak, weak_mask)], dim=1)


@register_backbone("late_fusion")
def late_fusion(
    cfg: ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> MultimodalSurvivalModel:
    """Late fusion: ABMIL over strong tokens + ``model.weak_pool`` over group tokens -> head."""
    fusion = LateFusion(cfg.dim, cfg.pool_hidden, cfg.weak_pool, cfg.dropout)
    return build_multimodal(
        cfg,
        fusion,
        group_index=group_index,
        strong_kind=strong_kind,
        strong_dim=strong_dim,
        n_outputs=n_outputs,
    )
