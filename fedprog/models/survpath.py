"""SurvPath backbone (Jaume et al. 2024, paper_spec §5): pathway/WSI cross-attention, no WSI-WSI attention."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedprog.models.encoders import masked_mean
from fedprog.models.model import MultimodalSurvivalModel, build_multimodal
from fedprog.models.registry import ModelConfig, register_backbone

__all__ = ["SurvPathFusion"]


class SurvPathFusion(nn.Module):
    """SurvPath's multimodal attention layer, feed-forward, LayerNorm and modality-wise mean pooling.

    - LayerNorm(D), one head ``qkv = Linear(D -> 3 attn_dim, bias=False)``, queries scaled by
      ``attn_dim^-1/2``;
    - pathway (weak) queries attend over pathway + WSI keys in one softmax (padded WSI keys masked out);
    - WSI (strong) queries attend to pathway keys only: no N x N WSI self-attention, memory O(N G);
    - FeedForward (LN -> Linear -> GELU -> Dropout -> Linear, no residual), then LayerNorm;
    - mean of the pathway tokens and masked mean of the WSI tokens, concatenated: ``out_dim = 2 attn_dim``.

    Parameters
    ----------
    dim : int
        Token width D.
    attn_dim : int
        Attention width (SurvPath's dim_head, 128).
    dropout : float
        Feed-forward dropout (0.1).
    """

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=False)
        self.scale = 1.0 / math.sqrt(attn_dim)
        self.feed_forward = nn.Sequential(
            nn.LayerNorm(attn_dim),
            nn.Linear(attn_dim, attn_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(attn_dim, attn_dim),
        )
        self.out_norm = nn.LayerNorm(attn_dim)
        self.out_dim = 2 * attn_dim

    def attend(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor, weak_mask: Tensor | None = None
    ) -> Tensor:
        """Token outputs ``[B, G + Ns, attn_dim]`` (pathway tokens first) after attention, FF, LayerNorm.

        Masked tokens (``strong_mask``/``weak_mask`` False) are never keys.
        """
        n_groups = weak.shape[1]
        if weak_mask is None:
            weak_mask = strong_mask.new_ones(strong_mask.shape[0], n_groups)
        q, k, v = self.qkv(self.norm(torch.cat([weak, strong], dim=1))).chunk(
            3, dim=-1
        )  # (B, G + Ns, A) each
        q = q * self.scale
        q_w, q_s = q[:, :n_groups], q[:, n_groups:]
        k_w, v_w = k[:, :n_groups], v[:, :n_groups]
        key_mask = torch.cat([weak_mask, strong_mask], dim=1)  # (B, G+Ns)
        scores_w = torch.einsum("bga,bka->bgk", q_w, k).masked_fill(~key_mask[:, None, :], float("-inf"))
        out_w = torch.einsum("bgk,bka->bga", scores_w.softmax(dim=-1), v)  # (B, G, A)
        scores_s = torch.einsum("bna,bga->bng", q_s, k_w).masked_fill(
            ~weak_mask[:, None, :], float("-inf")
        )  # (B, Ns, G)
        out_s = torch.einsum("bng,bga->bna", scores_s.softmax(dim=-1), v_w)  # (B, Ns, A)
        return self.out_norm(self.feed_forward(torch.cat([out_w, out_s], dim=1)))

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor, weak_mask: Tensor | None = None
    ) -> Tensor:
        """Fuse WSI ``strong`` [B, Ns, D] and pathway ``weak`` [B, G, D] tokens -> [B, 2 attn_dim]."""
        n_groups = weak.shape[1]
        out = self.attend(strong, weak, strong_mask, weak_mask)
        pooled_weak = masked_mean(out[:, :n_groups], weak_mask)
        return torch.cat([pooled_weak, masked_mean(out[:, n_groups:], strong_mask)], dim=1)


@register_backbone("survpath")
def survpath(
    cfg: ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> MultimodalSurvivalModel:
    """SurvPath: group SNN tokens + WSI (or tabular) tokens -> SurvPathFusion -> head (2 attn_dim, 64, n)."""
    fusion = SurvPathFusion(cfg.dim, cfg.attn_dim, cfg.dropout)
    return build_multimodal(
        cfg,
        fusion,
        group_index=group_index,
        strong_kind=strong_kind,
        strong_dim=strong_dim,
        n_outputs=n_outputs,
    )
