"""MCAT backbone (Chen et al. 2021): genomics-guided co-attention, per-modality transformers, ABMIL."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedprog.models.encoders import GatedAttentionPool
from fedprog.models.model import MultimodalSurvivalModel, build_multimodal
from fedprog.models.registry import ModelConfig, register_backbone

__all__ = ["MCATFusion"]


def _transformer(dim: int, heads: int, ff: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=dim, nhead=heads, dim_feedforward=ff, dropout=dropout, activation="relu", batch_first=True
    )
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


class MCATFusion(nn.Module):
    """Genomic-guided co-attention: G group tokens query the (masked) WSI tokens; both G-token sets then go
    through their own transformer and gated attention pooling; the two pooled vectors are concatenated.

    Memory is O(G N) in the number of patches N: the transformers only see G tokens.

    Parameters
    ----------
    dim : int
        Token width D.
    coattn_heads : int
        Heads of the co-attention (MCAT: 1).
    transformer_heads, transformer_ff, transformer_layers : int
        Per-modality transformer encoders (MCAT: 8 heads, 512 feed-forward, 2 layers).
    pool_hidden : int
        Hidden width of the gated attention pooling.
    dropout : float
    """

    def __init__(
        self,
        dim: int,
        coattn_heads: int,
        transformer_heads: int,
        transformer_ff: int,
        transformer_layers: int,
        pool_hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.coattention = nn.MultiheadAttention(dim, coattn_heads, batch_first=True)
        self.path_transformer = _transformer(
            dim, transformer_heads, transformer_ff, transformer_layers, dropout
        )
        self.omic_transformer = _transformer(
            dim, transformer_heads, transformer_ff, transformer_layers, dropout
        )
        self.path_pool = GatedAttentionPool(dim, pool_hidden, dropout)
        self.omic_pool = GatedAttentionPool(dim, pool_hidden, dropout)
        self.out_dim = 2 * dim

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor, weak_mask: Tensor | None = None
    ) -> Tensor:
        """Fuse WSI ``strong`` [B, Ns, D] and group ``weak`` [B, G, D] tokens -> [B, 2 D].

        Masked group tokens (``weak_mask`` False) are neither keys of the transformers nor pooled.
        """
        coattended, _ = self.coattention(
            weak, strong, strong, key_padding_mask=~strong_mask, need_weights=False
        )
        padding = None if weak_mask is None else ~weak_mask
        path, _ = self.path_pool(self.path_transformer(coattended, src_key_padding_mask=padding), weak_mask)
        omic, _ = self.omic_pool(self.omic_transformer(weak, src_key_padding_mask=padding), weak_mask)
        return torch.cat([path, omic], dim=1)


@register_backbone("mcat")
def mcat(
    cfg: ModelConfig,
    *,
    group_index: Sequence[Sequence[int]],
    strong_kind: str,
    strong_dim: int,
    n_outputs: int,
) -> MultimodalSurvivalModel:
    """MCAT: group tokens co-attend over the strong tokens; concat of the two pooled modalities -> head."""
    fusion = MCATFusion(
        cfg.dim,
        cfg.coattn_heads,
        cfg.transformer_heads,
        cfg.transformer_ff,
        cfg.transformer_layers,
        cfg.pool_hidden,
        cfg.dropout,
    )
    return build_multimodal(
        cfg,
        fusion,
        group_index=group_index,
        strong_kind=strong_kind,
        strong_dim=strong_dim,
        n_outputs=n_outputs,
    )
