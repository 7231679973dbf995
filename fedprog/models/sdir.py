"""SDIR, the Sparse Dirac Information Rebalancer: suppress the dominant modality, stabilize the other.

Two variants (``variant``), both followed by the Dirac stabilization of the non-dominant modality:

1. ``modality`` (default, issue 10): with probability ``p`` per sample (in training), the whole dominant
   modality is switched off for that sample (its tokens become zeros; masks are kept so that no backbone
   sees an empty bag). The fusion then has to predict from the other modality alone for that sample: the
   modality-dropout form of rebalancing (a token-level mask cannot rebalance: a bag's mean barely moves when
   half its patches go). ``adaptive`` scales ``p`` per sample by the dominance ratio (below).
2. ``token`` (paper_spec Part A): dominant tokens are dropped whole with probability ``p`` (and the other
   modality's too with ``mask_modalities="both"``, the official code); at least one real token is kept per
   sample; dropped tokens are zeroed *and removed from the mask*, so attention and pooling never see them
   (no "ghost" tokens); optional inverted scaling ``1 / (1 - p)``.

Dirac stabilization of the non-dominant modality: ``u = (W - mu_n) / sigma_n`` (per-token channel
statistics, detached), ``W' = W + gamma (W - mu_n) exp(-u^2 / (2 eps^2))``. It is a deterministic map, applied
in training *and* evaluation by default (``dirac_in_eval=True``), so that weak tokens have the same spread in
both; ``dirac_in_eval=False`` makes it train-only noise (the official behaviour, tested as such).

``adaptive``: p per sample from the dominant modality's ratio ``r = d / (d + o)`` of mean token norms
(``d`` dominant, ``o`` other), ``p_b = clip(2 p r_b, p_min, p_max)``; balanced modalities (r = 0.5) get ``p``.

``dominant`` names the modality that is suppressed: ``strong`` (the WSI bag or table, the paper) or ``weak``
(the expression), e.g. when the strong modality is the clinical table whose signal transfers best.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedprog.models.registry import ModelConfigError, ModelInputError
from fedprog.models.tokens import ModalityTokens

__all__ = ["SDIR", "dirac_stabilize", "token_statistics", "uniform_like"]

MASK_MODALITIES = ("strong", "both")
VARIANTS = ("modality", "token")
DOMINANT = ("strong", "weak")


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
    """Sparse Dirac Information Rebalancer; ``forward(strong, weak, strong_mask, weak_mask) -> tokens``.

    Parameters
    ----------
    variant : {"modality", "token"}, default: "modality"
        Drop the whole dominant modality per sample, or single dominant tokens (removed from the mask).
    p : float, default: 0.5
        Drop probability (of the modality per sample, or of each token).
    dominant : {"strong", "weak"}, default: "strong"
        The modality that is suppressed; the other one gets the Dirac stabilization.
    mask_modalities : {"strong", "both"}, default: "strong"
        Token variant: drop dominant tokens only (paper) or both modalities' tokens (official code).
    rescale : bool, default: False
        Token variant: multiply kept tokens by ``1 / (1 - p)`` (inverted dropout); the code does not.
    gamma : float, default: 1.0
        Dirac stabilization gain (0 = off).
    eps : float, default: 1.0
        Width of the nascent Dirac delta.
    stat_eps : float, default: 1e-6
        Variance floor of the per-token statistics.
    dirac_in_eval : bool, default: True
        Apply the (deterministic) Dirac stabilization in evaluation too; False = train-only.
    adaptive : bool, default: False
        Per-sample p from the dominance ratio, clipped to ``[p_min, p_max]``.
    p_min, p_max : float, default: 0.1, 0.9
    generator : torch.Generator, optional
        Source of randomness; None uses the global torch RNG (seeded by ``torch.manual_seed``).
    """

    def __init__(
        self,
        variant: str = "modality",
        p: float = 0.5,
        dominant: str = "strong",
        mask_modalities: str = "strong",
        rescale: bool = False,
        gamma: float = 1.0,
        eps: float = 1.0,
        stat_eps: float = 1e-6,
        dirac_in_eval: bool = True,
        adaptive: bool = False,
        p_min: float = 0.1,
        p_max: float = 0.9,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_choice("variant", variant, VARIANTS)
        _check_choice("dominant", dominant, DOMINANT)
        _check_choice("mask_modalities", mask_modalities, MASK_MODALITIES)
        if not 0.0 <= p <= 1.0 or (rescale and p == 1.0):
            raise ModelConfigError(f"model.sdir.p={p} must lie in [0, 1] ([0, 1) with rescale)")
        if gamma < 0.0 or eps <= 0.0 or stat_eps <= 0.0:
            raise ModelConfigError(
                f"model.sdir needs gamma >= 0, eps > 0 and stat_eps > 0 (got {gamma}, {eps}, {stat_eps})"
            )
        if not 0.0 <= p_min <= p_max < 1.0:
            raise ModelConfigError(
                f"model.sdir needs 0 <= p_min <= p_max < 1 (got p_min={p_min}, p_max={p_max})"
            )
        self.variant, self.p, self.dominant = variant, p, dominant
        self.mask_modalities, self.rescale = mask_modalities, rescale
        self.gamma, self.eps, self.stat_eps, self.dirac_in_eval = gamma, eps, stat_eps, dirac_in_eval
        self.adaptive, self.p_min, self.p_max = adaptive, p_min, p_max
        self.generator = generator
        self.last_dropped: Tensor | None = None  # modality variant: [B] bool, samples whose modality went

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``print(model)``."""
        return (
            f"variant={self.variant}, p={self.p}, dominant={self.dominant}, "
            f"mask_modalities={self.mask_modalities}, rescale={self.rescale}, gamma={self.gamma}, "
            f"eps={self.eps}, dirac_in_eval={self.dirac_in_eval}, adaptive={self.adaptive}"
        )

    def drop_probability(self, strong: Tensor, weak: Tensor, strong_mask: Tensor | None = None) -> Tensor:
        """Per-sample drop probability ``[B]``: ``p``, or the adaptive ``clip(2 p r_b, p_min, p_max)``."""
        batch = strong.shape[0]
        if not self.adaptive:
            return torch.full((batch,), self.p, device=strong.device)
        with torch.no_grad():
            strong_norm = _masked_token_mean(strong.norm(dim=-1), strong_mask)  # (B,)
            weak_norm = weak.norm(dim=-1).mean(dim=1)  # (B,)
            dominant_norm = strong_norm if self.dominant == "strong" else weak_norm
            ratio = dominant_norm / (strong_norm + weak_norm).clamp_min(self.stat_eps)
            return (2.0 * self.p * ratio).clamp(self.p_min, self.p_max)

    def keep_mask(self, tokens: Tensor, p: Tensor, mask: Tensor | None = None) -> Tensor:
        """Kept tokens ``[B, N]``: each real token kept with prob. ``1 - p_b``; >= 1 real kept per sample."""
        batch, n_tokens = tokens.shape[:2]
        real = torch.ones(batch, n_tokens, dtype=torch.bool, device=tokens.device) if mask is None else mask
        keep = (uniform_like((batch, n_tokens), tokens, self.generator) >= p[:, None]) & real  # (B, N)
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            # Rescue one uniformly chosen real token in each sample that lost them all.
            scores = uniform_like((batch, n_tokens), tokens, self.generator).masked_fill(~real, -1.0)
            rescue = torch.zeros_like(keep).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
            keep = keep | (rescue & empty[:, None])
        return keep

    def sparsify(self, tokens: Tensor, p: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token variant on one modality -> (tokens with dropped ones zeroed, new mask [B, N])."""
        keep = self.keep_mask(tokens, p, mask)
        scale = keep.to(tokens.dtype)
        if self.rescale:
            scale = scale / (1.0 - p[:, None]).to(tokens.dtype)
        return tokens * scale.unsqueeze(-1), keep

    def drop_modality(self, tokens: Tensor, p: Tensor) -> Tensor:
        """Modality variant: zero all of a sample's ``tokens`` [B, N, D] with probability ``p_b``."""
        dropped = uniform_like((tokens.shape[0],), tokens, self.generator) < p  # (B,)
        self.last_dropped = dropped
        return tokens * (~dropped).to(tokens.dtype)[:, None, None]

    def stabilize(self, tokens: ModalityTokens) -> ModalityTokens:
        """Dirac stabilization of the non-dominant modality."""
        if self.dominant == "strong":
            return tokens._replace(weak=dirac_stabilize(tokens.weak, self.gamma, self.eps, self.stat_eps))
        return tokens._replace(strong=dirac_stabilize(tokens.strong, self.gamma, self.eps, self.stat_eps))

    def rebalance(self, tokens: ModalityTokens) -> ModalityTokens:
        """The training-time drop of the selected variant (no Dirac stabilization)."""
        strong, weak, strong_mask, weak_mask = tokens
        p = self.drop_probability(strong, weak, strong_mask)
        if self.variant == "modality":
            if self.dominant == "strong":
                return tokens._replace(strong=self.drop_modality(strong, p))
            return tokens._replace(weak=self.drop_modality(weak, p))
        drop_strong = self.dominant == "strong" or self.mask_modalities == "both"
        drop_weak = self.dominant == "weak" or self.mask_modalities == "both"
        if drop_strong:
            strong, strong_mask = self.sparsify(strong, p, strong_mask)
        if drop_weak:
            weak, weak_mask = self.sparsify(weak, p, weak_mask)
        return ModalityTokens(strong, weak, strong_mask, weak_mask)

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor | None = None, weak_mask: Tensor | None = None
    ) -> ModalityTokens:
        """Rebalance ``strong`` [B, Ns, D] against ``weak`` [B, Nw, D]; masks [B, N] bool, True = real.

        Eval mode: only the Dirac stabilization (if ``dirac_in_eval``), masks unchanged.
        """
        if strong_mask is None:
            strong_mask = torch.ones(strong.shape[:2], dtype=torch.bool, device=strong.device)
        tokens = ModalityTokens(strong, weak, strong_mask, weak_mask)
        self.last_dropped = None
        if self.training:
            tokens = self.rebalance(tokens)
        elif not self.dirac_in_eval:
            return tokens
        return self.stabilize(tokens)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ModelConfigError(f"model.sdir.{key}={value!r}; choose one of {allowed}")


def _masked_token_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, N] over real tokens -> [B]."""
    if mask is None:
        return values.mean(dim=1)
    weights = mask.to(values.dtype)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
