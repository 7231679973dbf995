"""Tests pinning the semantics of SDIR (fedprog.models.sdir)."""

from __future__ import annotations

import math

import pytest
import torch

from fedprog.models import SDIR, ModelConfigError
from fedprog.models.sdir import dirac_stabilize


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dropped(out: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: the token is all zero."""
    return (out == 0).all(dim=-1)


def test_identity_in_eval_mode():
    sdir = SDIR(p=0.9, mask_modalities="both", gamma=1.5).eval()
    strong, weak = torch.randn(2, 30, 8), torch.randn(2, 5, 8)
    out_strong, out_weak = sdir(strong, weak)
    assert out_strong is strong and out_weak is weak


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_sparsification_rate_matches_p(p):
    sdir = SDIR(p=p, gamma=0.0, generator=_gen(1)).train()
    strong = torch.ones(4, 5000, 3)
    out, _ = sdir(strong, torch.randn(4, 3, 3))
    rate = _dropped(out).float().mean().item()
    # 20,000 Bernoulli draws: standard error <= 0.0036; 4 sigma
    assert rate == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 20000))


def test_whole_tokens_dropped_exactly_zero_and_kept_unscaled():
    sdir = SDIR(p=0.5, gamma=0.0, generator=_gen(2)).train()
    strong = torch.randn(3, 200, 16)
    out, _ = sdir(strong, torch.randn(3, 4, 16))
    dropped = _dropped(out)
    assert dropped.any() and (~dropped).any()
    assert torch.equal(out[~dropped], strong[~dropped])  # kept rows unchanged bit for bit
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))


def test_rescale_divides_kept_tokens_by_keep_probability():
    sdir = SDIR(p=0.25, rescale=True, gamma=0.0, generator=_gen(3)).train()
    strong = torch.randn(1, 100, 4)
    out, _ = sdir(strong, torch.randn(1, 2, 4))
    kept = ~_dropped(out)
    torch.testing.assert_close(out[kept], strong[kept] / 0.75)


def test_at_least_one_real_token_kept_and_padding_never_kept():
    sdir = SDIR(p=0.99, gamma=0.0, generator=_gen(4)).train()
    strong = torch.randn(64, 6, 4) + 10.0  # no token is naturally zero
    mask = torch.zeros(64, 6, dtype=torch.bool)
    mask[:, :2] = True  # two real tokens, four padded
    rescued = 0
    for _ in range(20):
        out, _ = sdir(strong, torch.randn(64, 3, 4), mask)
        kept = ~_dropped(out)
        assert (kept & mask).sum(dim=1).min() >= 1
        assert not (kept & ~mask).any()
        rescued += int(((kept & mask).sum(dim=1) == 1).sum())
    assert rescued > 0


def test_strong_mode_leaves_weak_tokens_undropped_and_both_mode_drops_them():
    weak = torch.randn(2, 400, 8) + 5.0
    _, out_weak = SDIR(p=0.5, gamma=0.0, generator=_gen(5)).train()(torch.randn(2, 10, 8), weak)
    assert torch.equal(out_weak, weak)
    _, out_weak = SDIR(p=0.5, mask_modalities="both", gamma=0.0, generator=_gen(5)).train()(
        torch.randn(2, 10, 8), weak
    )
    assert _dropped(out_weak).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert (~_dropped(out_weak)).sum(dim=1).min() >= 1


def _by_hand(token: list[float], gamma: float, eps: float, stat_eps: float = 1e-6) -> list[float]:
    d = len(token)
    mu = sum(token) / d
    sigma = math.sqrt(sum((x - mu) ** 2 for x in token) / (d - 1) + stat_eps)
    return [x + gamma * (x - mu) * math.exp(-(((x - mu) / sigma) ** 2) / (2 * eps**2)) for x in token]


@pytest.mark.parametrize(("gamma", "eps"), [(1.0, 1.0), (0.5, 0.3), (2.0, 2.0)])
def test_dirac_stabilization_matches_its_formula(gamma, eps):
    token = [1.0, 2.0, 3.0, 6.0]
    weak = torch.tensor([[token, [0.0, -1.0, 4.0, 1.5]]], dtype=torch.float64)
    out = dirac_stabilize(weak, gamma, eps)
    torch.testing.assert_close(out[0, 0], torch.tensor(_by_hand(token, gamma, eps), dtype=torch.float64))
    torch.testing.assert_close(
        out[0, 1], torch.tensor(_by_hand([0.0, -1.0, 4.0, 1.5], gamma, eps), dtype=torch.float64)
    )
    # worked example for token [1, 2, 3, 6], gamma = eps = 1: mu = 3, sigma^2 = 14/3 (+1e-6)
    if gamma == 1.0 and eps == 1.0:
        assert out[0, 0, 0].item() == pytest.approx(1 - 2 * math.exp(-4 / (2 * 14 / 3)), rel=1e-5)
        assert out[0, 0, 2].item() == pytest.approx(3.0)  # the token mean is a fixed point


def test_dirac_stabilization_is_applied_to_weak_tokens_in_training():
    weak = torch.randn(2, 5, 8)
    _, out_weak = SDIR(p=0.5, gamma=1.0, eps=1.0, generator=_gen(6)).train()(torch.randn(2, 9, 8), weak)
    torch.testing.assert_close(out_weak, dirac_stabilize(weak, 1.0, 1.0))
    _, unchanged = SDIR(p=0.5, gamma=0.0).train()(torch.randn(2, 9, 8), weak)
    assert torch.equal(unchanged, weak)


def test_dirac_gain_is_bounded_by_one_plus_gamma_and_monotone():
    x = torch.linspace(-5, 5, 201, dtype=torch.float64)
    weak = x.reshape(1, 1, -1)
    out = dirac_stabilize(weak, gamma=2.0, eps=1.0)[0, 0]
    centred_in, centred_out = x - x.mean(), out - x.mean()
    gain = centred_out[centred_in != 0] / centred_in[centred_in != 0]
    assert gain.max().item() <= 3.0 + 1e-12 and gain.min().item() >= 1.0
    assert (out.diff() > 0).all()  # gamma = 2 < 2.24 keeps the map monotone


def test_gradients_flow_through_kept_tokens_and_weak_tokens():
    strong = torch.randn(2, 50, 8, requires_grad=True)
    weak = torch.randn(2, 6, 8, requires_grad=True)
    out_strong, out_weak = SDIR(p=0.5, generator=_gen(7)).train()(strong, weak)
    (out_strong.sum() + (out_weak * torch.randn_like(out_weak)).sum()).backward()
    dropped = _dropped(out_strong)
    assert torch.equal(strong.grad[dropped], torch.zeros_like(strong.grad[dropped]))
    assert torch.equal(strong.grad[~dropped], torch.ones_like(strong.grad[~dropped]))
    assert torch.isfinite(weak.grad).all() and weak.grad.abs().sum() > 0


def test_different_token_counts_with_padding():
    strong, weak = torch.randn(2, 300, 16), torch.randn(2, 7, 16)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 120:] = False
    out_strong, out_weak = SDIR(p=0.5, mask_modalities="both", generator=_gen(8)).train()(strong, weak, mask)
    assert out_strong.shape == (2, 300, 16) and out_weak.shape == (2, 7, 16)
    assert _dropped(out_strong)[1, 120:].all()


def test_adaptive_probability_follows_dominance_ratio():
    sdir = SDIR(p=0.4, adaptive=True, p_min=0.1, p_max=0.7)
    weak = torch.ones(3, 4, 4)  # token norm 2
    strong = torch.stack([torch.full((5, 4), v) for v in (1.0, 0.5, 100.0)])  # token norms 2, 1, 200
    p = sdir.drop_probability(strong, weak)
    # ratios 1/2, 1/3, 200/202 -> 2 * 0.4 * ratio = 0.4, 0.2667, 0.792 -> clipped to 0.7
    torch.testing.assert_close(p, torch.tensor([0.4, 0.8 / 3, 0.7]))
    assert torch.equal(SDIR(p=0.4).drop_probability(strong, weak), torch.full((3,), 0.4))


def test_adaptive_rate_reaches_p_max_for_a_dominant_strong_modality():
    sdir = SDIR(p=0.5, adaptive=True, p_min=0.1, p_max=0.8, gamma=0.0, generator=_gen(9)).train()
    out, _ = sdir(torch.full((2, 4000, 4), 50.0), torch.full((2, 3, 4), 0.01))
    assert _dropped(out).float().mean().item() == pytest.approx(0.8, abs=0.03)


def test_seeded_generator_reproduces_masks():
    strong, weak = torch.randn(2, 100, 8), torch.randn(2, 5, 8)
    first, _ = SDIR(generator=_gen(10)).train()(strong, weak)
    second, _ = SDIR(generator=_gen(10)).train()(strong, weak)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1.0}, r"model.sdir.p=1.0 must lie in \[0, 1\)"),
        ({"mask_modalities": "weak"}, "model.sdir.mask_modalities='weak'"),
        ({"eps": 0.0}, "eps > 0"),
        ({"p_min": 0.5, "p_max": 0.2}, "p_min <= p_max"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        SDIR(**kwargs)
