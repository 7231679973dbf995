"""CADE, token variant (``model.cade.variant=token``): cross-modal per-token statistics mixing (Part A).

Kept as the named "official-code" variant. Its per-token statistics are removed by any per-token LayerNorm
(SurvPath normalizes every token before attention), and it never sees another patient: see ``cade.py`` for
the default style variant.

In training, with probability ``p_aug`` per forward call, every token x^a_n of modality a is re-styled with
statistics taken on a path between its own (mu^a_n, sigma^a_n) and partner statistics from the other modality:

    z = (x - mu) / sigma                       (per-token channel statistics, detached, unbiased var + eps)
    lambda_n ~ Beta(alpha, alpha)              (per sample and token)
    mu^    = lambda mu + (1 - lambda) mu~
    sigma^ = lambda sigma + (1 - lambda) sigma~          (path="linear", the code)
    log sigma^ = lambda log sigma + (1 - lambda) log sigma~   (path="geometric")
    x' = z sigma^ + mu^                        (gradients flow through z only)

Partners: ``kernel`` (default) averages the other modality's (mu, log sigma) with weights
``softmax_m(-||(mu_n, log sigma_n) - (mu_m, log sigma_m)||^2 / h)``, h = median squared distance or a number;
``random`` takes ``pi[n mod N_other]`` for a random permutation pi of the other modality's real tokens (the
official code's idea with its index bug fixed, paper_spec §7.2 option b). Padded strong tokens are never
partners and come out unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedprog.models.registry import ModelConfigError, ModelInputError
from fedprog.models.sdir import token_statistics, uniform_like

__all__ = [
    "CADEMix",
    "TokenCADE",
    "beta_draws",
    "blend_statistics",
    "kernel_partner_weights",
    "random_partner_index",
]

PARTNERS = ("kernel", "random")
PATHS = ("linear", "geometric")


@dataclass(frozen=True)
class CADEMix:
    """Statistics of the last CADE firing (detached), for diagnostics and tests; shapes ``[B, N, 1]``."""

    lam_strong: Tensor
    lam_weak: Tensor
    mu_strong: Tensor
    sigma_strong: Tensor
    mu_weak: Tensor
    sigma_weak: Tensor


def kernel_partner_weights(
    mu_a: Tensor,
    log_sigma_a: Tensor,
    mu_b: Tensor,
    log_sigma_b: Tensor,
    *,
    bandwidth: Tensor,
    mask_b: Tensor | None = None,
) -> Tensor:
    """Kernel weights of modality-b tokens for each modality-a token.

    Parameters
    ----------
    mu_a, log_sigma_a : Tensor, float, shape = (B, Na)
    mu_b, log_sigma_b : Tensor, float, shape = (B, Nb)
    bandwidth : Tensor, float, shape = (B,)
        Kernel bandwidth h per sample (> 0).
    mask_b : Tensor, bool, shape = (B, Nb), optional
        Real tokens of modality b; padded ones get weight 0.

    Returns
    -------
    Tensor, float, shape = (B, Na, Nb)
        ``K_nm = softmax_m(-d2_nm / h)``; each row sums to 1 over the real b tokens.
    """
    d2 = (mu_a[:, :, None] - mu_b[:, None, :]) ** 2 + (log_sigma_a[:, :, None] - log_sigma_b[:, None, :]) ** 2
    logits = -d2 / bandwidth[:, None, None]
    if mask_b is not None:
        logits = logits.masked_fill(~mask_b[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=2)


def median_bandwidth(
    mu_s: Tensor, log_sigma_s: Tensor, mu_w: Tensor, log_sigma_w: Tensor, mask_s: Tensor, floor: float
) -> Tensor:
    """Median squared (mu, log sigma) distance of real strong x weak pairs per sample -> ``[B]``, >= floor."""
    d2 = (mu_s[:, :, None] - mu_w[:, None, :]) ** 2 + (log_sigma_s[:, :, None] - log_sigma_w[:, None, :]) ** 2
    d2 = d2.masked_fill(~mask_s[:, :, None], float("nan"))  # (B, Ns, Nw)
    return d2.flatten(1).nanmedian(dim=1).values.clamp_min(floor)


def random_partner_index(n_query: int, mask_b: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Partner positions ``rho(n) = pi[n mod k]`` in modality b for ``n_query`` tokens of modality a.

    Parameters
    ----------
    n_query : int
        Number of modality-a tokens Na.
    mask_b : Tensor, bool, shape = (B, Nb)
        Real tokens of modality b (k = their count per sample; pi permutes them).
    generator : torch.Generator, optional

    Returns
    -------
    Tensor, long, shape = (B, Na)
        Indices into modality b's token axis, always of real tokens.
    """
    batch, n_b = mask_b.shape
    keys = uniform_like((batch, n_b), mask_b, generator).masked_fill(~mask_b, 2.0)  # padding sorts last
    permutation = keys.argsort(dim=1)  # (B, Nb): real tokens first, in random order
    counts = mask_b.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
    positions = torch.arange(n_query, device=mask_b.device)[None, :] % counts  # (B, Na)
    return permutation.gather(1, positions)


def beta_draws(
    alpha: float, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Beta(alpha, alpha) draws of ``shape`` on ``like``'s device and dtype, seeded from the torch RNG.

    torch's Beta distribution takes no generator, so a seed drawn from ``generator`` (or the global torch RNG)
    drives numpy's.
    """
    device = generator.device if generator is not None else like.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    draws = np.random.default_rng(seed).beta(alpha, alpha, size=shape)
    return torch.as_tensor(draws, dtype=like.dtype, device=like.device)


def blend_statistics(
    lam: Tensor, mu: Tensor, sigma: Tensor, mu_partner: Tensor, sigma_partner: Tensor, path: str
) -> tuple[Tensor, Tensor]:
    """Point ``lam`` on the path from own to partner statistics (all ``[B, N, 1]``) -> (mu^, sigma^)."""
    mu_hat = lam * mu + (1.0 - lam) * mu_partner
    if path == "linear":
        sigma_hat = lam * sigma + (1.0 - lam) * sigma_partner
    else:
        sigma_hat = torch.exp(lam * sigma.log() + (1.0 - lam) * sigma_partner.log())
    return mu_hat, sigma_hat


class TokenCADE(nn.Module):
    """CADE, token variant; ``forward(strong, weak, strong_mask, weak_mask) -> (strong, weak)``.

    Parameters
    ----------
    p_aug : float, default: 0.3
        Probability that CADE fires on a forward call (training only).
    alpha : float, default: 0.1
        Beta(alpha, alpha) concentration of the mixing weight lambda.
    partner : {"kernel", "random"}, default: "kernel"
    path : {"linear", "geometric"}, default: "linear"
    bandwidth : "median" or float, default: "median"
        Kernel bandwidth h; "median" = median squared distance of the sample's strong x weak pairs.
    eps : float, default: 1e-6
        Variance floor of the per-token statistics (and floor of the median bandwidth).
    generator : torch.Generator, optional
        Source of randomness; None uses the global torch RNG.
    """

    def __init__(
        self,
        p_aug: float = 0.3,
        alpha: float = 0.1,
        partner: str = "kernel",
        path: str = "linear",
        bandwidth: float | str = "median",
        eps: float = 1e-6,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_aug <= 1.0:
            raise ModelConfigError(f"model.cade.p_aug={p_aug} must lie in [0, 1]")
        if alpha <= 0.0 or eps <= 0.0:
            raise ModelConfigError(f"model.cade needs alpha > 0 and eps > 0 (got alpha={alpha}, eps={eps})")
        if partner not in PARTNERS:
            raise ModelConfigError(f"model.cade.partner={partner!r}; choose one of {PARTNERS}")
        if path not in PATHS:
            raise ModelConfigError(f"model.cade.path={path!r}; choose one of {PATHS}")
        if not (bandwidth == "median" or (isinstance(bandwidth, int | float) and bandwidth > 0)):
            raise ModelConfigError(f"model.cade.bandwidth={bandwidth!r}; use 'median' or a positive number")
        self.p_aug, self.alpha, self.partner, self.path = p_aug, alpha, partner, path
        self.bandwidth, self.eps, self.generator = bandwidth, eps, generator
        self.last_mix: CADEMix | None = None

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``print(model)``."""
        return f"p_aug={self.p_aug}, alpha={self.alpha}, partner={self.partner}, path={self.path}"

    def _beta(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        """Beta(alpha, alpha) draws [B, N, 1]."""
        return beta_draws(self.alpha, shape, like, self.generator).unsqueeze(-1)

    def _partners(
        self, mu_s: Tensor, ls_s: Tensor, mu_w: Tensor, ls_w: Tensor, mask: Tensor, weak_mask: Tensor
    ) -> tuple[Tensor, ...]:
        """Partner (mu~, log sigma~) for strong tokens (from real weak) and weak tokens (from real strong)."""
        if self.partner == "random":
            to_weak = random_partner_index(mu_s.shape[1], weak_mask, self.generator)  # (B, Ns)
            to_strong = random_partner_index(mu_w.shape[1], mask, self.generator)  # (B, Nw)
            return (
                mu_w.gather(1, to_weak),
                ls_w.gather(1, to_weak),
                mu_s.gather(1, to_strong),
                ls_s.gather(1, to_strong),
            )
        if self.bandwidth == "median":
            h = median_bandwidth(mu_s, ls_s, mu_w, ls_w, mask, self.eps)
        else:
            h = torch.full((mu_s.shape[0],), float(self.bandwidth), dtype=mu_s.dtype, device=mu_s.device)
        k_sw = kernel_partner_weights(mu_s, ls_s, mu_w, ls_w, bandwidth=h, mask_b=weak_mask)  # (B, Ns, Nw)
        k_ws = kernel_partner_weights(mu_w, ls_w, mu_s, ls_s, bandwidth=h, mask_b=mask)  # (B, Nw, Ns)
        return (
            torch.einsum("bnm,bm->bn", k_sw, mu_w),
            torch.einsum("bnm,bm->bn", k_sw, ls_w),
            torch.einsum("bnm,bm->bn", k_ws, mu_s),
            torch.einsum("bnm,bm->bn", k_ws, ls_s),
        )

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor | None = None, weak_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Entangle ``strong`` [B, Ns, D] and ``weak`` [B, Nw, D] statistics (identity in eval mode).

        Masked tokens (padding, or tokens SDIR removed) are never partners and pass unchanged.
        """
        self.last_mix = None
        if not self.training or self.p_aug == 0.0:
            return strong, weak
        if float(uniform_like((1,), strong, self.generator)) >= self.p_aug:
            return strong, weak
        if strong.shape[0] != weak.shape[0] or strong.shape[-1] != weak.shape[-1]:
            raise ModelInputError(
                f"CADE needs the same batch size and width in both modalities, got {tuple(strong.shape)} and "
                f"{tuple(weak.shape)}"
            )
        batch, n_strong = strong.shape[:2]
        mask = strong_mask if strong_mask is not None else strong.new_ones(batch, n_strong, dtype=torch.bool)
        wmask = weak_mask if weak_mask is not None else weak.new_ones(weak.shape[:2], dtype=torch.bool)
        mu_s, sigma_s = token_statistics(strong, self.eps)  # (B, Ns, 1)
        mu_w, sigma_w = token_statistics(weak, self.eps)  # (B, Nw, 1)
        pmu_s, pls_s, pmu_w, pls_w = self._partners(
            mu_s[..., 0], sigma_s[..., 0].log(), mu_w[..., 0], sigma_w[..., 0].log(), mask, wmask
        )
        lam_s = self._beta((batch, n_strong), strong)
        lam_w = self._beta((batch, weak.shape[1]), weak)
        mu_hat_s, sigma_hat_s = blend_statistics(
            lam_s, mu_s, sigma_s, pmu_s[..., None], pls_s.exp()[..., None], self.path
        )
        mu_hat_w, sigma_hat_w = blend_statistics(
            lam_w, mu_w, sigma_w, pmu_w[..., None], pls_w.exp()[..., None], self.path
        )
        self.last_mix = CADEMix(lam_s, lam_w, mu_hat_s, sigma_hat_s, mu_hat_w, sigma_hat_w)
        new_strong = (strong - mu_s) / sigma_s * sigma_hat_s + mu_hat_s
        new_weak = (weak - mu_w) / sigma_w * sigma_hat_w + mu_hat_w
        new_strong = torch.where(mask[..., None], new_strong, strong)  # padding passes unchanged
        new_weak = torch.where(wmask[..., None], new_weak, weak)
        return new_strong, new_weak
