"""Modality encoders (WSI bag projector, tabular and gene-group tokenizers) and masked pooling layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fedprog.models.registry import ModelConfigError, ModelInputError

__all__ = [
    "BagProjector",
    "GatedAttentionPool",
    "GroupTokenizer",
    "SNNBlock",
    "TabularTokenizer",
    "masked_mean",
]


def masked_mean(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the token axis counting only real tokens.

    Parameters
    ----------
    tokens : Tensor, float, shape = (B, N, D)
    mask : Tensor, bool, shape = (B, N), optional
        True = real token; None = all real.

    Returns
    -------
    Tensor, float, shape = (B, D)
    """
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class BagProjector(nn.Module):
    """WSI bag projector: patch features ``[B, N, F]`` -> tokens ``[B, N, D]``.

    Parameters
    ----------
    in_dim : int
        Patch-feature width F.
    dim : int
        Token width D.
    activation : {"none", "relu"}
        ``none``: a single Linear (SurvPath); ``relu``: Linear -> ReLU -> Dropout (MCAT, ABMIL).
    dropout : float
        Dropout after the ReLU (ignored for ``none``).
    """

    def __init__(self, in_dim: int, dim: int, activation: str = "none", dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, dim)]
        if activation == "relu":
            layers += [nn.ReLU(), nn.Dropout(dropout)]
        elif activation != "none":
            raise ModelConfigError(f"model.projector_act={activation!r}; choose 'none' or 'relu'")
        self.net = nn.Sequential(*layers)

    def forward(self, bag: Tensor) -> Tensor:
        """Project ``bag`` [B, N, F] to tokens [B, N, D]."""
        if bag.shape[-1] != self.in_dim:
            raise ModelInputError(
                f"batch.strong has {bag.shape[-1]} features per patch, the model expects {self.in_dim}"
            )
        return self.net(bag)


class TabularTokenizer(nn.Module):
    """Tabular tokenizer: feature f of value x_f becomes the token ``x_f * w_f + b_f`` (FT-Transformer style).

    Parameters
    ----------
    n_features : int
        Number of tabular features F (the strong modality arrives as ``[B, F, 1]``).
    dim : int
        Token width D.
    """

    def __init__(self, n_features: int, dim: int) -> None:
        super().__init__()
        self.n_features = n_features
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(n_features, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_features, dim).uniform_(-bound, bound))

    def forward(self, table: Tensor) -> Tensor:
        """Embed ``table`` [B, F, 1] (or [B, F]) into tokens [B, F, D]."""
        if table.dim() == 3:
            if table.shape[-1] != 1:
                raise ModelInputError(
                    f"tabular batch.strong must have shape [B, F, 1], got {tuple(table.shape)} (a WSI bag?)"
                )
            table = table[..., 0]
        if table.shape[-1] != self.n_features:
            raise ModelInputError(
                f"batch.strong has {table.shape[-1]} tabular features, the model expects {self.n_features}"
            )
        return table.unsqueeze(-1) * self.weight + self.bias


class SNNBlock(nn.Sequential):
    """Self-normalizing block: Linear -> ELU -> AlphaDropout (SurvPath/MCAT's ``SNN_Block``)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.ELU(), nn.AlphaDropout(dropout))


class GroupTokenizer(nn.Module):
    """One two-layer self-normalizing network per gene group -> one token per group, batched over groups.

    Group g maps its n_g genes through ``Linear(n_g -> D) -> ELU -> AlphaDropout -> Linear(D -> D) -> ELU ->
    AlphaDropout`` (SurvPath's pathway SNNs). All groups run at once: genes are gathered into a padded
    ``[B, G, max_n]`` tensor (padding = 0 and masked) and multiplied with a grouped weight ``[G, max_n, D]``;
    padded weight rows start at zero and receive no gradient, so each group behaves as its own Linear(n_g, D).

    Parameters
    ----------
    group_index : list of list of int
        Column positions of each group's genes in ``batch.expression``.
    dim : int
        Token width D.
    dropout : float
        AlphaDropout rate (SurvPath: 0.25).
    """

    def __init__(self, group_index: Sequence[Sequence[int]], dim: int, dropout: float = 0.25) -> None:
        super().__init__()
        sizes = [len(g) for g in group_index]
        if not sizes or min(sizes) < 1:
            raise ModelConfigError("group_index needs at least one group and one gene per group")
        n_groups, max_n = len(sizes), max(sizes)
        index_rows = np.zeros((n_groups, max_n), dtype=np.int64)  # numpy: a client rebuilds this per message
        for g, genes in enumerate(group_index):
            index_rows[g, : len(genes)] = genes
        index = torch.from_numpy(index_rows)
        mask = torch.arange(max_n)[None, :] < torch.tensor(sizes)[:, None]
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("gene_mask", mask, persistent=False)
        self.n_required = int(index.max()) + 1
        # Per-group nn.Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the group's own fan_in.
        bound1 = (1.0 / torch.tensor(sizes, dtype=torch.float32).sqrt())[:, None, None]  # (G, 1, 1)
        self.weight1 = nn.Parameter((torch.rand(n_groups, max_n, dim) * 2 - 1) * bound1 * mask[..., None])
        self.bias1 = nn.Parameter((torch.rand(n_groups, dim) * 2 - 1) * bound1[:, :, 0])
        bound2 = 1.0 / math.sqrt(dim)
        self.weight2 = nn.Parameter((torch.rand(n_groups, dim, dim) * 2 - 1) * bound2)
        self.bias2 = nn.Parameter((torch.rand(n_groups, dim) * 2 - 1) * bound2)
        self.act = nn.ELU()
        self.drop1 = nn.AlphaDropout(dropout)
        self.drop2 = nn.AlphaDropout(dropout)

    @property
    def n_groups(self) -> int:
        """Number of gene groups G (= number of weak tokens)."""
        return self.index.shape[0]

    def forward(self, expression: Tensor) -> Tensor:
        """Tokenize ``expression`` [B, n_genes] into group tokens [B, G, D]."""
        if expression.dim() != 2 or expression.shape[1] < self.n_required:
            raise ModelInputError(
                f"batch.expression has shape {tuple(expression.shape)}; the gene groups need "
                f"[B, >= {self.n_required}]"
            )
        genes = expression[:, self.index] * self.gene_mask  # (B, G, max_n), padding = 0
        hidden = torch.einsum("bgn,gnd->bgd", genes, self.weight1) + self.bias1
        hidden = self.drop1(self.act(hidden))
        tokens = torch.einsum("bgd,gde->bge", hidden, self.weight2) + self.bias2
        return self.drop2(self.act(tokens))


class GatedAttentionPool(nn.Module):
    """Gated attention-MIL pooling (Ilse et al. 2018) that ignores padded tokens.

    ``a_n = w^T (tanh(V h_n) * sigmoid(U h_n))``, softmax over real tokens, output ``sum_n a_n h_n``.

    Parameters
    ----------
    dim : int
        Token width D.
    hidden : int
        Width of the V/U projections.
    dropout : float
        Dropout on the gating branches.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, 1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool ``tokens`` [B, N, D] with ``mask`` [B, N] -> (pooled [B, D], attention [B, N])."""
        scores = self.score(self.tanh_branch(tokens) * self.gate_branch(tokens)).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        return torch.einsum("bn,bnd->bd", attention, tokens), attention
