"""SDIR, the Sparse Dirac Information Rebalancer: Bernoulli token sparsification + Dirac stabilization.

Definition (docs paper_spec Part A): in training only,

1. strong tokens (and weak ones too with ``mask_modalities="both"``, the official code) are dropped whole with
   probability ``p``: ``S'_n = m_n S_n``, ``m_n ~ Bernoulli(1 - p)``, at least one real token kept per sample,
   optionally rescaled by ``1 / (1 - p)``; padded tokens are never kept (they come out as zeros);
2. the weak tokens are stabilized with a nascent Dirac delta used as a gain on small deviations:
   ``u = (W - mu_n) / sigma_n`` (per-token channel statistics, detached),
   ``W' = W + gamma (W - mu_n) exp(-u^2 / (2 eps^2))``;
3. ``adaptive``: p per patient from the strong modality's dominance ratio ``r = s / (s + w)`` (``s``, ``w``
   the mean token norms), ``p_b = clip(2 p r_b, p_min, p_max)``, so balanced modalities (r = 0.5) get ``p``.

Masks are drawn per sample and token; with batch size 1 (the paper's setting) this is the code's shared mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedprog.models.registry import ModelConfigError, ModelInputError

__all__ = ["SDIR", "dirac_stabilize", "token_statistics", "uniform_like"]

MASK_MODALITIES = ("strong", "both")


def token_statistics(tokens: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-token mean and standard deviation over channels, detached.

    Parameters
    ----------
    tokens : Tensor, float, shape = (B, N, D), D >= 2
    eps : float
        Added to the unbiased variance before the square root.

    Returns
    -------
    mu, sigma : Tensor, float, shape = (B, N, 1)
        ``mu = mean_d x``, ``sigma = sqrt(var_unbiased_d x + eps)``, both without gradient.
    """
    if tokens.shape[-1] < 2:
        raise ModelInputError(f"per-token statistics need at least 2 channels, got D={tokens.shape[-1]}")
    detached = tokens.detach()
    mu = detached.mean(dim=-1, keepdim=True)
    sigma = (detached.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()
    return mu, sigma


def dirac_stabilize(tokens: Tensor, gamma: float, eps: float, stat_eps: float = 1e-6) -> Tensor:
    """Dirac-inspired stabilization ``W' = W + gamma (W - mu) exp(-u^2 / (2 eps^2))``, ``u = (W - mu) / s``.

    Parameters
    ----------
    tokens : Tensor, float, shape = (B, N, D)
        Weak-modality tokens.
    gamma : float
        Maximal extra gain (at the token mean); 0 disables the stabilization. Monotone for 0 <= gamma < 2.24.
    eps : float
        Width of the nascent delta in standardized units.
    stat_eps : float
        Variance floor of the detached per-token statistics.

    Returns
    -------
    Tensor, float, shape = (B, N, D)
    """
    if gamma == 0.0:
        return tokens
    mu, sigma = token_statistics(tokens, stat_eps)
    centred = tokens - mu
    u = centred / sigma
    return tokens + gamma * centred * torch.exp(-(u**2) / (2.0 * eps**2))


def uniform_like(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) draws from ``generator`` (on its device) or the global RNG (on ``like``'s device)."""
    if generator is None:
        return torch.rand(shape, device=like.device)
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


class SDIR(nn.Module):
    """Sparse Dirac Information Rebalancer; ``forward(strong, weak, strong_mask) -> (strong, weak)``.

    Parameters
    ----------
    p : float, default: 0.5
        Token drop probability.
    mask_modalities : {"strong", "both"}, default: "strong"
        ``strong``: the paper (suppress the dominant modality); ``both``: the official code.
    rescale : bool, default: False
        Multiply kept tokens by ``1 / (1 - p)`` (inverted dropout); the code does not.
    gamma : float, default: 1.0
        Dirac stabilization gain on the weak tokens (0 = off).
    eps : float, default: 1.0
        Width of the nascent Dirac delta.
    stat_eps : float, default: 1e-6
        Variance floor of the per-token statistics.
    adaptive : bool, default: False
        Per-patient p from the dominance ratio, clipped to ``[p_min, p_max]``.
    p_min, p_max : float, default: 0.1, 0.9
    generator : torch.Generator, optional
        Source of randomness; None uses the global torch RNG (seeded by ``torch.manual_seed``).
    """

    def __init__(
        self,
        p: float = 0.5,
        mask_modalities: str = "strong",
        rescale: bool = False,
        gamma: float = 1.0,
        eps: float = 1.0,
        stat_eps: float = 1e-6,
        adaptive: bool = False,
        p_min: float = 0.1,
        p_max: float = 0.9,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ModelConfigError(f"model.sdir.p={p} must lie in [0, 1)")
        if mask_modalities not in MASK_MODALITIES:
            raise ModelConfigError(
                f"model.sdir.mask_modalities={mask_modalities!r}; choose one of {MASK_MODALITIES}"
            )
        if gamma < 0.0 or eps <= 0.0 or stat_eps <= 0.0:
            raise ModelConfigError(
                f"model.sdir needs gamma >= 0, eps > 0 and stat_eps > 0 (got {gamma}, {eps}, {stat_eps})"
            )
        if not 0.0 <= p_min <= p_max < 1.0:
            raise ModelConfigError(
                f"model.sdir needs 0 <= p_min <= p_max < 1 (got p_min={p_min}, p_max={p_max})"
            )
        self.p, self.mask_modalities, self.rescale = p, mask_modalities, rescale
        self.gamma, self.eps, self.stat_eps = gamma, eps, stat_eps
        self.adaptive, self.p_min, self.p_max = adaptive, p_min, p_max
        self.generator = generator

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``print(model)``."""
        return (
            f"p={self.p}, mask_modalities={self.mask_modalities}, rescale={self.rescale}, "
            f"gamma={self.gamma}, eps={self.eps}, adaptive={self.adaptive}"
        )

    def drop_probability(self, strong: Tensor, weak: Tensor, strong_mask: Tensor | None = None) -> Tensor:
        """Per-sample drop probability ``[B]``: ``p``, or the adaptive ``clip(2 p r_b, p_min, p_max)``."""
        batch = strong.shape[0]
        if not self.adaptive:
            return torch.full((batch,), self.p, device=strong.device)
        with torch.no_grad():
            strong_norm = _masked_token_mean(strong.norm(dim=-1), strong_mask)  # (B,)
            weak_norm = weak.norm(dim=-1).mean(dim=1)  # (B,)
            ratio = strong_norm / (strong_norm + weak_norm).clamp_min(self.stat_eps)
            return (2.0 * self.p * ratio).clamp(self.p_min, self.p_max)

    def sparsify(self, tokens: Tensor, p: Tensor, mask: Tensor | None = None) -> Tensor:
        """Drop whole tokens of ``tokens`` [B, N, D] with per-sample probability ``p`` [B]; keep >= 1 real."""
        batch, n_tokens = tokens.shape[:2]
        real = torch.ones(batch, n_tokens, dtype=torch.bool, device=tokens.device) if mask is None else mask
        keep = (uniform_like((batch, n_tokens), tokens, self.generator) >= p[:, None]) & real  # (B, N)
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            # Rescue one uniformly chosen real token in each sample that lost them all.
            scores = uniform_like((batch, n_tokens), tokens, self.generator).masked_fill(~real, -1.0)
            rescue = torch.zeros_like(keep).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
            keep = keep | (rescue & empty[:, None])
        scale = keep.to(tokens.dtype)
        if self.rescale:
            scale = scale / (1.0 - p[:, None]).to(tokens.dtype)
        return tokens * scale.unsqueeze(-1)

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Rebalance ``strong`` [B, Ns, D] against ``weak`` [B, Nw, D] (identity in eval mode).

        ``strong_mask`` [B, Ns] bool marks real strong tokens (True); padding is never kept.
        """
        if not self.training:
            return strong, weak
        p = self.drop_probability(strong, weak, strong_mask)
        strong = self.sparsify(strong, p, strong_mask)
        if self.mask_modalities == "both":
            weak = self.sparsify(weak, p)
        weak = dirac_stabilize(weak, self.gamma, self.eps, self.stat_eps)
        return strong, weak


def _masked_token_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, N] over real tokens -> [B]."""
    if mask is None:
        return values.mean(dim=1)
    weights = mask.to(values.dtype)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
