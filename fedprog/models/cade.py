"""CADE, Cancer-aware Distribution Entanglement, style variant (default): bag style mixed across patients.

Style is a per-channel shift and scale shared by the tokens of a bag (a cancer's or a scanner's colour,
a site's batch effect), the axis of MixStyle (Zhou et al., ICLR 2021) and DSU (Li et al., ICLR 2022). For
each modality a in {strong, weak} and sample b, over the real tokens n of the bag (patches; pathway tokens):

    mu_bc = mean_n x_bnc,  sigma_bc = sqrt(var_n x_bnc + eps)      (per channel c, detached)
    z_bnc = (x_bnc - mu_bc) / sigma_bc                             (the content, kept)
    mix:  partner (mu~, sigma~) = another patient's statistics: another sample of the batch or of a running
          bank of recent patients (``bank_size``), or, with probability ``external_prob``, an entry of the
          external bank a federation installs (:meth:`CADE.set_external_bank`);
          lambda_b ~ Beta(alpha, alpha); mu^ = lambda mu + (1 - lambda) mu~, sigma^ likewise (``path=linear``)
          or log sigma^ likewise (``path=geometric``)
    dsu:  mu^ += N(0, 1) s_mu dsu_scale, log sigma^ += N(0, 1) s_log_sigma dsu_scale, with s the per-channel
          spread of the statistics over the batch and the banks (DSU's uncertainty sampling, on log sigma
          rather than sigma so that sigma^ stays positive)
    x'_bnc = z_bnc sigma^_bc + mu^_bc                              (gradients flow through z only)

It sits on the encoder outputs, before the fusion: a per-channel shift/scale of every token is *not* removed
by a per-token LayerNorm (SurvPath's), unlike the token variant's per-token statistics (``cade_token.py``).
The running bank makes it work at batch size 1. It fires with probability ``p_aug`` per training step, is the
identity in evaluation, leaves padding (and masked tokens) unchanged, and skips samples whose modality SDIR
switched off (all-zero tokens), which also never enter the bank.

Federated style sharing: :meth:`CADE.style_summary` gives aggregate per-channel statistics of the bag styles
seen since :meth:`CADE.reset_style_summary` (count, mean and variance of mu and of log sigma per channel; None
below ``summary_min_count`` bags, never a patient's statistics); :func:`pool_style_summaries` pools sites'
summaries; :func:`sample_style_bank` draws a bank from a pooled summary for :meth:`CADE.set_external_bank`.
The banks are non-persistent buffers: they never enter ``state_dict`` nor the federated weight arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedprog.models.cade_token import (
    CADEMix,
    TokenCADE,
    beta_draws,
    blend_statistics,
    kernel_partner_weights,
    random_partner_index,
)
from fedprog.models.registry import CADEConfig, ModelConfigError, ModelInputError
from fedprog.models.sdir import uniform_like

__all__ = [
    "CADE",
    "CADEMix",
    "StyleMix",
    "StyleSummary",
    "TokenCADE",
    "blend_statistics",
    "build_cade",
    "channel_statistics",
    "kernel_partner_weights",
    "pool_style_summaries",
    "random_partner_index",
    "sample_style_bank",
]

MODES = ("mix", "dsu", "mix_dsu")
PATHS = ("linear", "geometric")
MODALITIES = ("both", "strong", "weak")
POSITIONS = ("encoded", "input")
SLOTS = ("strong", "weak")


def channel_statistics(tokens: Tensor, mask: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and std of each bag over its real tokens, detached.

    Parameters
    ----------
    tokens : Tensor, float, shape = (B, N, D)
    mask : Tensor, bool, shape = (B, N), optional
        Real tokens (None = all).
    eps : float
        Added to the unbiased variance (denominator ``max(n - 1, 1)``) before the square root.

    Returns
    -------
    mu, sigma : Tensor, float, shape = (B, D)
    present : Tensor, bool, shape = (B,)
        The sample has a non-zero real token (False when SDIR switched the modality off).
    """
    x = tokens.detach().float() if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.detach()
    weights = x.new_ones(x.shape[:2]) if mask is None else mask.to(x.dtype)
    count = weights.sum(dim=1, keepdim=True)  # (B, 1)
    mu = (x * weights[..., None]).sum(dim=1) / count.clamp_min(1.0)
    var = (((x - mu[:, None]) ** 2) * weights[..., None]).sum(dim=1) / (count - 1.0).clamp_min(1.0)
    present = ((x.abs() * weights[..., None]).sum(dim=(1, 2)) > 0) & (count[:, 0] > 0)
    return mu, (var + eps).sqrt(), present


@dataclass(frozen=True)
class StyleMix:
    """One modality's statistics at the last CADE firing (detached); ``[B, D]`` except ``lam``/``source``."""

    mu: Tensor
    sigma: Tensor
    mu_hat: Tensor
    sigma_hat: Tensor
    lam: Tensor  # [B] mixing weight on the sample's own statistics
    source: Tensor  # [B] long: -1 unchanged (no partner), 0 batch/local bank, 1 external bank, 2 DSU only


@dataclass(frozen=True)
class StyleSummary:
    """Aggregate per-channel statistics of ``count`` bag styles (float64 ``[D]``): what a site shares."""

    count: int
    mu_mean: np.ndarray
    mu_var: np.ndarray
    log_sigma_mean: np.ndarray
    log_sigma_var: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (``count`` as a 0-d int64 array), e.g. for a Flower ``ArrayRecord``."""
        return {
            "count": np.asarray(self.count, dtype=np.int64),
            "mu_mean": self.mu_mean,
            "mu_var": self.mu_var,
            "log_sigma_mean": self.log_sigma_mean,
            "log_sigma_var": self.log_sigma_var,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> StyleSummary:
        """Inverse of :meth:`to_arrays`."""
        values = {k: np.asarray(arrays[k], dtype=np.float64) for k in ("mu_mean", "mu_var")}
        values |= {k: np.asarray(arrays[k], dtype=np.float64) for k in ("log_sigma_mean", "log_sigma_var")}
        return cls(count=int(np.asarray(arrays["count"])), **values)


def pool_style_summaries(summaries: list[StyleSummary]) -> StyleSummary:
    """Count-weighted pooling of several sites' summaries (law of total variance)."""
    if not summaries:
        raise ModelInputError("pool_style_summaries needs at least one summary")
    counts = np.array([s.count for s in summaries], dtype=np.float64)
    weights = counts / counts.sum()

    def pooled(mean_key: str, var_key: str) -> tuple[np.ndarray, np.ndarray]:
        means = np.stack([getattr(s, mean_key) for s in summaries])
        variances = np.stack([getattr(s, var_key) for s in summaries])
        mean = weights @ means
        return mean, weights @ (variances + (means - mean) ** 2)

    mu_mean, mu_var = pooled("mu_mean", "mu_var")
    ls_mean, ls_var = pooled("log_sigma_mean", "log_sigma_var")
    return StyleSummary(int(counts.sum()), mu_mean, mu_var, ls_mean, ls_var)


def sample_style_bank(
    summary: StyleSummary, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``k`` styles (mu ``[k, D]``, sigma ``[k, D]``, float32) from a summary's diagonal Gaussian.

    mu ~ N(mu_mean, mu_var) and log sigma ~ N(log_sigma_mean, log_sigma_var), channels independent.
    """
    if k < 1:
        raise ModelInputError(f"sample_style_bank needs k >= 1, got {k}")
    dim = summary.mu_mean.shape[0]
    noise = torch.randn(2, k, dim, generator=generator, dtype=torch.float64)
    mu = torch.from_numpy(summary.mu_mean) + noise[0] * torch.from_numpy(summary.mu_var).sqrt()
    log_sigma = (
        torch.from_numpy(summary.log_sigma_mean) + noise[1] * torch.from_numpy(summary.log_sigma_var).sqrt()
    )
    return mu.float(), log_sigma.exp().float()


class CADE(nn.Module):
    """CADE, style variant; ``forward(strong, weak, strong_mask, weak_mask) -> (strong, weak)``.

    Parameters
    ----------
    p_aug : float, default: 0.3
        Probability that CADE fires on a training step.
    alpha : float, default: 0.1
        Beta(alpha, alpha) concentration of the mixing weight (MixStyle: 0.1).
    mode : {"mix", "dsu", "mix_dsu"}, default: "mix"
    path : {"linear", "geometric"}, default: "linear"
    modalities : {"both", "strong", "weak"}, default: "both"
        The modalities that are re-styled.
    bank_size : int, default: 64
        Recent patients' statistics kept per modality (0 = batch partners only).
    external_prob : float, default: 0.5
        Probability that a sample's partner comes from the external bank, when one is installed.
    dsu_scale : float, default: 1.0
        Multiplier of the DSU noise.
    summary_min_count : int, default: 10
        :meth:`style_summary` returns None below this many bag styles.
    eps : float, default: 1e-6
        Variance floor of the statistics.
    position : {"encoded", "input"}, default: "encoded"
        Where the strong modality (WSI bag) is re-styled: its encoder outputs, or its input patch features
        (:meth:`restyle_inputs`, before the encoder), the axis on which stain, scanner and cancer style act
        on the features themselves. Expression tokens are re-styled on the encoder outputs either way.
    generator : torch.Generator, optional
    """

    def __init__(
        self,
        p_aug: float = 0.3,
        alpha: float = 0.1,
        mode: str = "mix",
        path: str = "linear",
        modalities: str = "both",
        bank_size: int = 64,
        external_prob: float = 0.5,
        dsu_scale: float = 1.0,
        summary_min_count: int = 10,
        eps: float = 1e-6,
        position: str = "encoded",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for key, value, allowed in (
            ("mode", mode, MODES),
            ("path", path, PATHS),
            ("modalities", modalities, MODALITIES),
            ("position", position, POSITIONS),
        ):
            if value not in allowed:
                raise ModelConfigError(f"model.cade.{key}={value!r}; choose one of {allowed}")
        for key, value in (("p_aug", p_aug), ("external_prob", external_prob)):
            if not 0.0 <= value <= 1.0:
                raise ModelConfigError(f"model.cade.{key}={value} must lie in [0, 1]")
        if alpha <= 0.0 or eps <= 0.0 or dsu_scale < 0.0:
            raise ModelConfigError(
                f"model.cade needs alpha > 0, eps > 0 and dsu_scale >= 0 (got {alpha}, {eps}, {dsu_scale})"
            )
        if bank_size < 0 or summary_min_count < 1:
            raise ModelConfigError(
                f"model.cade needs bank_size >= 0 and summary_min_count >= 1 (got {bank_size}, "
                f"{summary_min_count})"
            )
        self.p_aug, self.alpha, self.mode, self.path = p_aug, alpha, mode, path
        self.slots = SLOTS if modalities == "both" else (modalities,)
        self.bank_size, self.external_prob, self.dsu_scale = bank_size, external_prob, dsu_scale
        self.summary_min_count, self.eps, self.generator = summary_min_count, eps, generator
        self.position = position
        self.last_mix: dict[str, StyleMix] = {}
        self._step_fire: bool | None = None  # position=input: the firing draw of the current step
        self._fill = dict.fromkeys(SLOTS, 0)  # entries in each local bank
        self._next = dict.fromkeys(SLOTS, 0)  # ring-buffer write position
        self._seen = dict.fromkeys(SLOTS, 0)  # bag styles in the summary accumulators
        for slot in SLOTS:
            for name in ("bank_mu", "bank_sigma", "external_mu", "external_sigma", "summary"):
                self.register_buffer(f"{name}_{slot}", torch.empty(0), persistent=False)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``print(model)``."""
        return (
            f"variant=style, position={self.position}, p_aug={self.p_aug}, alpha={self.alpha}, "
            f"mode={self.mode}, path={self.path}, "
            f"modalities={'+'.join(self.slots)}, bank_size={self.bank_size}, "
            f"external_prob={self.external_prob}"
        )

    # ------------------------------------------------------------------ banks

    def bank(self, modality: str) -> tuple[Tensor, Tensor]:
        """The local bank of ``modality``: (mu ``[n, D]``, sigma ``[n, D]``) of recent patients."""
        n = self._fill[modality]
        return getattr(self, f"bank_mu_{modality}")[:n], getattr(self, f"bank_sigma_{modality}")[:n]

    def set_external_bank(self, mu: Tensor, sigma: Tensor, modality: str = "strong") -> None:
        """Install styles from elsewhere (other sites' pooled statistics): mu, sigma ``[K, D]``, sigma > 0."""
        _check_slot(modality)
        if mu.dim() != 2 or mu.shape != sigma.shape or mu.shape[0] < 1:
            raise ModelInputError(
                f"set_external_bank({modality!r}) needs mu and sigma of one shape [K >= 1, D], got "
                f"{tuple(mu.shape)} and {tuple(sigma.shape)}"
            )
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all() and (sigma > 0).all()):
            raise ModelInputError(
                f"set_external_bank({modality!r}): mu must be finite and sigma finite and > 0"
            )
        local = getattr(self, f"bank_mu_{modality}")
        if local.numel() and local.shape[1] != mu.shape[1]:
            raise ModelInputError(
                f"set_external_bank({modality!r}): width {mu.shape[1]} differs from the tokens' "
                f"{local.shape[1]}"
            )
        device = local.device
        setattr(self, f"external_mu_{modality}", mu.detach().to(device=device, dtype=torch.float32).clone())
        setattr(
            self, f"external_sigma_{modality}", sigma.detach().to(device=device, dtype=torch.float32).clone()
        )

    def clear_external_bank(self, modality: str = "strong") -> None:
        """Remove the external bank of ``modality``."""
        _check_slot(modality)
        setattr(self, f"external_mu_{modality}", torch.empty(0, device=self.bank_mu_strong.device))
        setattr(self, f"external_sigma_{modality}", torch.empty(0, device=self.bank_mu_strong.device))

    def external_bank(self, modality: str) -> tuple[Tensor, Tensor]:
        """The external bank of ``modality`` (empty tensors when none is installed)."""
        return getattr(self, f"external_mu_{modality}"), getattr(self, f"external_sigma_{modality}")

    def style_summary(self, modality: str = "strong", min_count: int | None = None) -> StyleSummary | None:
        """Aggregate per-channel statistics of the bags seen since the last reset; None below min_count."""
        _check_slot(modality)
        limit = self.summary_min_count if min_count is None else max(int(min_count), 1)
        n = self._seen[modality]
        if n < limit:
            return None
        sums = getattr(self, f"summary_{modality}").double().cpu().numpy()  # (4, D)
        mu_mean, ls_mean = sums[0] / n, sums[2] / n
        mu_var = np.maximum(sums[1] / n - mu_mean**2, 0.0)
        ls_var = np.maximum(sums[3] / n - ls_mean**2, 0.0)
        return StyleSummary(n, mu_mean, mu_var, ls_mean, ls_var)

    def reset_style_summary(self) -> None:
        """Start a new summary window (e.g. at each federated round)."""
        for slot in SLOTS:
            self._seen[slot] = 0
            summary = getattr(self, f"summary_{slot}")
            if summary.numel():
                summary.zero_()

    def _remember(self, slot: str, mu: Tensor, sigma: Tensor) -> None:
        """Push styles ``[n, D]`` into the ring bank and the summary accumulators."""
        if mu.shape[0] == 0:
            return
        dim = mu.shape[1]
        if getattr(self, f"summary_{slot}").numel() == 0:
            setattr(self, f"summary_{slot}", torch.zeros(4, dim, dtype=torch.float64, device=mu.device))
            setattr(
                self, f"bank_mu_{slot}", torch.zeros(self.bank_size, dim, dtype=mu.dtype, device=mu.device)
            )
            setattr(
                self, f"bank_sigma_{slot}", torch.zeros(self.bank_size, dim, dtype=mu.dtype, device=mu.device)
            )
        log_sigma = sigma.double().log()
        summary = getattr(self, f"summary_{slot}")
        summary += torch.stack(
            [mu.double().sum(0), (mu.double() ** 2).sum(0), log_sigma.sum(0), (log_sigma**2).sum(0)]
        )
        self._seen[slot] += mu.shape[0]
        if self.bank_size == 0:
            return
        bank_mu, bank_sigma = getattr(self, f"bank_mu_{slot}"), getattr(self, f"bank_sigma_{slot}")
        for row in range(max(0, mu.shape[0] - self.bank_size), mu.shape[0]):
            position = self._next[slot]
            bank_mu[position], bank_sigma[position] = mu[row].to(bank_mu.dtype), sigma[row].to(bank_mu.dtype)
            self._next[slot] = (position + 1) % self.bank_size
            self._fill[slot] = min(self._fill[slot] + 1, self.bank_size)

    # ------------------------------------------------------------------ mixing

    def _partners(
        self, slot: str, mu: Tensor, sigma: Tensor, present: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Partner statistics ``[B, D]`` per sample and their source ``[B]`` (see :class:`StyleMix`)."""
        batch = mu.shape[0]
        bank_mu, bank_sigma = self.bank(slot)
        pool_mu = torch.cat([mu, bank_mu.to(mu.dtype)])  # (B + n_bank, D)
        pool_sigma = torch.cat([sigma, bank_sigma.to(sigma.dtype)])
        valid = torch.cat([present, present.new_ones(bank_mu.shape[0])])[None, :].repeat(batch, 1)
        valid[:, :batch] &= ~torch.eye(batch, dtype=torch.bool, device=mu.device)  # never oneself
        scores = uniform_like(tuple(valid.shape), mu, self.generator).masked_fill(~valid, -1.0)
        index = scores.argmax(dim=1)
        source = torch.where(valid.any(dim=1), 0, -1)
        partner_mu, partner_sigma = pool_mu[index], pool_sigma[index]
        ext_mu, ext_sigma = self.external_bank(slot)
        if ext_mu.numel():
            if ext_mu.shape[1] != mu.shape[1]:
                raise ModelInputError(
                    f"CADE external {slot} bank has width {ext_mu.shape[1]}, tokens {mu.shape[1]}"
                )
            use = (uniform_like((batch,), mu, self.generator) < self.external_prob) | (source < 0)
            pick = (
                (uniform_like((batch,), mu, self.generator) * ext_mu.shape[0])
                .long()
                .clamp_max(ext_mu.shape[0] - 1)
            )
            partner_mu = torch.where(use[:, None], ext_mu[pick].to(mu.dtype), partner_mu)
            partner_sigma = torch.where(use[:, None], ext_sigma[pick].to(mu.dtype), partner_sigma)
            source = torch.where(use, 1, source)
        has = source >= 0
        return (
            torch.where(has[:, None], partner_mu, mu),
            torch.where(has[:, None], partner_sigma, sigma),
            source,
        )

    def _spread(self, slot: str, mu: Tensor, sigma: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """DSU's per-channel spread of mu and log sigma over batch and banks ``[D]`` (0 below 2 styles)."""
        bank_mu, bank_sigma = self.bank(slot)
        ext_mu, ext_sigma = self.external_bank(slot)
        parts_mu, parts_sigma = [mu[present], bank_mu.to(mu.dtype)], [sigma[present], bank_sigma.to(mu.dtype)]
        if ext_mu.numel():
            parts_mu.append(ext_mu.to(mu.dtype))
            parts_sigma.append(ext_sigma.to(mu.dtype))
        all_mu, all_sigma = torch.cat(parts_mu), torch.cat(parts_sigma)
        if all_mu.shape[0] < 2:
            return torch.zeros_like(mu[0]), torch.zeros_like(mu[0])
        return all_mu.std(dim=0), all_sigma.log().std(dim=0)

    def _target(self, slot: str, mu: Tensor, sigma: Tensor, present: Tensor) -> StyleMix:
        """New statistics (mu^, sigma^) per sample for one modality."""
        batch = mu.shape[0]
        lam = torch.ones(batch, dtype=mu.dtype, device=mu.device)
        source = torch.full((batch,), -1, dtype=torch.long, device=mu.device)
        mu_hat, sigma_hat = mu, sigma
        if self.mode in ("mix", "mix_dsu"):
            partner_mu, partner_sigma, source = self._partners(slot, mu, sigma, present)
            lam = torch.where(source >= 0, beta_draws(self.alpha, (batch,), mu, self.generator), lam)
            mu_hat, sigma_hat = blend_statistics(
                lam[:, None], mu, sigma, partner_mu, partner_sigma, self.path
            )
        if self.mode in ("dsu", "mix_dsu"):
            spread_mu, spread_log_sigma = self._spread(slot, mu, sigma, present)
            noise = torch.randn(
                (2, *mu.shape), generator=self.generator, device=_rng_device(self.generator, mu)
            )
            noise = noise.to(device=mu.device, dtype=mu.dtype) * self.dsu_scale
            mu_hat = mu_hat + noise[0] * spread_mu
            sigma_hat = sigma_hat * torch.exp(noise[1] * spread_log_sigma)
            source = torch.where(source < 0, 2, source)
        return StyleMix(mu, sigma, mu_hat, sigma_hat, lam, source)

    def _draw_fire(self, like: Tensor) -> bool:
        """Whether CADE fires on this training step (probability ``p_aug``)."""
        return self.p_aug > 0.0 and float(uniform_like((1,), like, self.generator)) < self.p_aug

    def restyle_inputs(self, strong: Tensor, mask: Tensor | None = None) -> Tensor:
        """``position="input"``: re-style the strong modality's input features ``[B, N, F]`` before its
        encoder, and keep this step's firing draw for :meth:`forward` (the expression tokens). The identity
        in eval mode, with ``position="encoded"`` or when ``modalities`` leaves out the strong modality."""
        self._step_fire = None
        if self.position != "input" or not self.training:
            return strong
        self.last_mix = {}
        self._step_fire = self._draw_fire(strong)
        if "strong" not in self.slots:
            return strong
        return self._restyle("strong", strong, mask, self._step_fire)

    def forward(
        self, strong: Tensor, weak: Tensor, strong_mask: Tensor | None = None, weak_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Re-style ``strong`` [B, Ns, D] and ``weak`` [B, Nw, D] bags (identity in eval mode); with
        ``position="input"`` the strong bag was re-styled by :meth:`restyle_inputs` and only ``weak`` is."""
        if not self.training:
            self.last_mix = {}
            return strong, weak
        slots = self.slots
        if self.position == "input":
            fire = self._step_fire if self._step_fire is not None else self._draw_fire(strong)
            self._step_fire = None
            slots = tuple(slot for slot in slots if slot == "weak")
        else:
            self.last_mix = {}
            fire = self._draw_fire(strong)
        out = {"strong": strong, "weak": weak}
        masks = {"strong": strong_mask, "weak": weak_mask}
        for slot in slots:
            out[slot] = self._restyle(slot, out[slot], masks[slot], fire)
        return out["strong"], out["weak"]

    def _restyle(self, slot: str, tokens: Tensor, mask: Tensor | None, fire: bool) -> Tensor:
        """One modality's bags re-styled when ``fire`` (else unchanged); their styles enter the banks."""
        if tokens.dim() != 3 or tokens.shape[1] == 0:
            shape = tuple(tokens.shape)
            raise ModelInputError(f"CADE needs {slot} tokens of shape [B, N >= 1, D], got {shape}")
        mu, sigma, present = channel_statistics(tokens, mask, self.eps)
        out = tokens
        if fire:
            mix = self._target(slot, mu, sigma, present)
            self.last_mix[slot] = mix
            restyled = (tokens - mu[:, None]) / sigma[:, None] * mix.sigma_hat[:, None] + mix.mu_hat[:, None]
            moved = present & (mix.source >= 0)  # a sample without partner (nor DSU) stays bit-exact
            change = moved[:, None] if mask is None else moved[:, None] & mask
            out = torch.where(change[..., None], restyled, tokens).to(tokens.dtype)
        self._remember(slot, mu[present], sigma[present])
        return out


def _check_slot(modality: str) -> None:
    if modality not in SLOTS:
        raise ModelInputError(f"modality={modality!r}; choose one of {SLOTS}")


def _rng_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


TOKEN_KEYS = ("p_aug", "alpha", "partner", "path", "bandwidth", "eps")
STYLE_KEYS = (
    "p_aug",
    "alpha",
    "mode",
    "path",
    "modalities",
    "bank_size",
    "external_prob",
    "dsu_scale",
    "summary_min_count",
    "eps",
    "position",
)


def build_cade(cfg: CADEConfig, generator: torch.Generator | None = None) -> CADE | TokenCADE:
    """The CADE module of ``model.cade.variant`` (``style`` or ``token``) with its keys from ``cfg``."""
    if cfg.variant == "token":
        return TokenCADE(**{k: getattr(cfg, k) for k in TOKEN_KEYS}, generator=generator)
    if cfg.variant == "style":
        return CADE(**{k: getattr(cfg, k) for k in STYLE_KEYS}, generator=generator)
    raise ModelConfigError(f"model.cade.variant={cfg.variant!r}; choose 'style' or 'token'")
