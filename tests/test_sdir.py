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


def test_identity_in_eval_mode_when_the_dirac_gain_is_train_only():
    sdir = SDIR(variant="token", p=0.9, mask_modalities="both", gamma=1.5, dirac_in_eval=False).eval()
    strong, weak = torch.randn(2, 30, 8), torch.randn(2, 5, 8)
    out = sdir(strong, weak)
    assert out.strong is strong and out.weak is weak and out.weak_mask is None


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_sparsification_rate_matches_p(p):
    sdir = SDIR(variant="token", p=p, gamma=0.0, generator=_gen(1)).train()
    strong = torch.ones(4, 5000, 3)
    out = sdir(strong, torch.randn(4, 3, 3)).strong
    rate = _dropped(out).float().mean().item()
    # 20,000 Bernoulli draws: standard error <= 0.0036; 4 sigma
    assert rate == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 20000))


def test_whole_tokens_dropped_exactly_zero_and_kept_unscaled():
    sdir = SDIR(variant="token", p=0.5, gamma=0.0, generator=_gen(2)).train()
    strong = torch.randn(3, 200, 16)
    out = sdir(strong, torch.randn(3, 4, 16)).strong
    dropped = _dropped(out)
    assert dropped.any() and (~dropped).any()
    assert torch.equal(out[~dropped], strong[~dropped])  # kept rows unchanged bit for bit
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))


def test_rescale_divides_kept_tokens_by_keep_probability():
    sdir = SDIR(variant="token", p=0.25, rescale=True, gamma=0.0, generator=_gen(3)).train()
    strong = torch.randn(1, 100, 4)
    out = sdir(strong, torch.randn(1, 2, 4)).strong
    kept = ~_dropped(out)
    torch.testing.assert_close(out[kept], strong[kept] / 0.75)


def test_at_least_one_real_token_kept_and_padding_never_kept():
    sdir = SDIR(variant="token", p=0.99, gamma=0.0, generator=_gen(4)).train()
    strong = torch.randn(64, 6, 4) + 10.0  # no token is naturally zero
    mask = torch.zeros(64, 6, dtype=torch.bool)
    mask[:, :2] = True  # two real tokens, four padded
    rescued = 0
    for _ in range(20):
        out = sdir(strong, torch.randn(64, 3, 4), mask).strong
        kept = ~_dropped(out)
        assert (kept & mask).sum(dim=1).min() >= 1
        assert not (kept & ~mask).any()
        rescued += int(((kept & mask).sum(dim=1) == 1).sum())
    assert rescued > 0


def test_strong_mode_leaves_weak_tokens_undropped_and_both_mode_drops_them():
    weak = torch.randn(2, 400, 8) + 5.0
    out = SDIR(variant="token", p=0.5, gamma=0.0, generator=_gen(5)).train()(torch.randn(2, 10, 8), weak)
    assert torch.equal(out.weak, weak) and out.weak_mask is None
    out = SDIR(variant="token", p=0.5, mask_modalities="both", gamma=0.0, generator=_gen(5)).train()(
        torch.randn(2, 10, 8), weak
    )
    assert _dropped(out.weak).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert (~_dropped(out.weak)).sum(dim=1).min() >= 1
    assert torch.equal(out.weak_mask, ~_dropped(out.weak))  # dropped weak tokens leave the mask


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
    out = SDIR(variant="token", p=0.5, gamma=1.0, eps=1.0, generator=_gen(6)).train()(
        torch.randn(2, 9, 8), weak
    )
    torch.testing.assert_close(out.weak, dirac_stabilize(weak, 1.0, 1.0))
    unchanged = SDIR(variant="token", p=0.5, gamma=0.0).train()(torch.randn(2, 9, 8), weak).weak
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
    out_strong, out_weak, _, _ = SDIR(variant="token", p=0.5, generator=_gen(7)).train()(strong, weak)
    (out_strong.sum() + (out_weak * torch.randn_like(out_weak)).sum()).backward()
    dropped = _dropped(out_strong)
    assert torch.equal(strong.grad[dropped], torch.zeros_like(strong.grad[dropped]))
    assert torch.equal(strong.grad[~dropped], torch.ones_like(strong.grad[~dropped]))
    assert torch.isfinite(weak.grad).all() and weak.grad.abs().sum() > 0


def test_different_token_counts_with_padding():
    strong, weak = torch.randn(2, 300, 16), torch.randn(2, 7, 16)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 120:] = False
    out = SDIR(variant="token", p=0.5, mask_modalities="both", generator=_gen(8)).train()(strong, weak, mask)
    assert out.strong.shape == (2, 300, 16) and out.weak.shape == (2, 7, 16)
    assert _dropped(out.strong)[1, 120:].all()
    assert not out.strong_mask[1, 120:].any()  # padding stays out of the mask
    assert torch.equal(out.strong_mask, ~_dropped(out.strong))  # dropped tokens leave the mask


def test_adaptive_probability_follows_dominance_ratio():
    sdir = SDIR(p=0.4, adaptive=True, p_min=0.1, p_max=0.7)
    weak = torch.ones(3, 4, 4)  # token norm 2
    strong = torch.stack([torch.full((5, 4), v) for v in (1.0, 0.5, 100.0)])  # token norms 2, 1, 200
    p = sdir.drop_probability(strong, weak)
    # ratios 1/2, 1/3, 200/202 -> 2 * 0.4 * ratio = 0.4, 0.2667, 0.792 -> clipped to 0.7
    torch.testing.assert_close(p, torch.tensor([0.4, 0.8 / 3, 0.7]))
    assert torch.equal(SDIR(p=0.4).drop_probability(strong, weak), torch.full((3,), 0.4))


def test_adaptive_rate_reaches_p_max_for_a_dominant_strong_modality():
    sdir = SDIR(
        variant="token", p=0.5, adaptive=True, p_min=0.1, p_max=0.8, gamma=0.0, generator=_gen(9)
    ).train()
    out = sdir(torch.full((2, 4000, 4), 50.0), torch.full((2, 3, 4), 0.01)).strong
    assert _dropped(out).float().mean().item() == pytest.approx(0.8, abs=0.03)


def test_seeded_generator_reproduces_masks():
    strong, weak = torch.randn(2, 100, 8), torch.randn(2, 5, 8)
    first = SDIR(variant="token", generator=_gen(10)).train()(strong, weak)
    second = SDIR(variant="token", generator=_gen(10)).train()(strong, weak)
    assert torch.equal(first.strong, second.strong) and torch.equal(first.strong_mask, second.strong_mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1.0, "rescale": True}, r"model.sdir.p=1.0 must lie in \[0, 1\] \(\[0, 1\) with rescale\)"),
        ({"p": -0.1}, r"model.sdir.p=-0.1 must lie in \[0, 1\]"),
        ({"variant": "patch"}, "model.sdir.variant='patch'"),
        ({"dominant": "rna"}, "model.sdir.dominant='rna'"),
        ({"mask_modalities": "weak"}, "model.sdir.mask_modalities='weak'"),
        ({"eps": 0.0}, "eps > 0"),
        ({"p_min": 0.5, "p_max": 0.2}, "p_min <= p_max"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        SDIR(**kwargs)


# ---------------------------------------------------------------- modality variant (default)


def test_modality_variant_drops_whole_samples_at_rate_p_and_keeps_masks():
    sdir = SDIR(p=0.3, gamma=0.0, generator=_gen(11)).train()
    assert sdir.variant == "modality"
    strong, weak = torch.randn(4000, 5, 4) + 3.0, torch.randn(4000, 3, 4)
    mask = torch.ones(4000, 5, dtype=torch.bool)
    out = sdir(strong, weak, mask)
    dropped = _dropped(out.strong).all(dim=1)  # (B,): the whole modality of that sample is gone
    assert torch.equal(dropped, sdir.last_dropped)
    assert (_dropped(out.strong).any(dim=1) == dropped).all()  # all or nothing per sample
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=4 * math.sqrt(0.21 / 4000))
    assert torch.equal(out.strong[~dropped], strong[~dropped])
    assert torch.equal(out.strong_mask, mask) and torch.equal(out.weak, weak)  # no empty bags for backbones


def test_modality_variant_with_dominant_weak_drops_the_expression_and_stabilizes_the_strong_tokens():
    strong, weak = torch.randn(500, 6, 8), torch.randn(500, 4, 8) + 2.0
    out = SDIR(p=0.5, dominant="weak", generator=_gen(12)).train()(strong, weak)
    dropped = _dropped(out.weak).all(dim=1)
    assert 0.4 < dropped.float().mean().item() < 0.6
    torch.testing.assert_close(out.strong, dirac_stabilize(strong, 1.0, 1.0))


def test_adaptive_modality_variant_drops_a_dominant_modality_more_often():
    sdir = SDIR(p=0.3, adaptive=True, p_min=0.05, p_max=0.9, gamma=0.0, generator=_gen(13)).train()
    weak = torch.ones(2000, 3, 4)  # token norm 2
    balanced = sdir(torch.ones(2000, 5, 4), weak).strong  # ratio 1/2 -> p = 0.3
    dominant = sdir(torch.full((2000, 5, 4), 50.0), weak).strong  # ratio ~ 0.98 -> p = 0.59
    assert _dropped(balanced).all(dim=1).float().mean().item() == pytest.approx(0.3, abs=0.04)
    assert _dropped(dominant).all(dim=1).float().mean().item() == pytest.approx(0.6 * 100 / 102, abs=0.04)


# ---------------------------------------------------------------- Dirac gain: train/eval consistency


@pytest.mark.parametrize("variant", ["modality", "token"])
def test_dirac_gain_is_the_same_in_training_and_evaluation_by_default(variant):
    strong, weak = torch.randn(3, 20, 8), torch.randn(3, 5, 8)
    sdir = SDIR(variant=variant, p=0.0, gamma=1.0, generator=_gen(14))
    trained = sdir.train()(strong, weak)
    evaluated = sdir.eval()(strong, weak)
    torch.testing.assert_close(trained.weak, evaluated.weak)
    torch.testing.assert_close(evaluated.weak, dirac_stabilize(weak, 1.0, 1.0))
    assert not torch.equal(evaluated.weak, weak)  # the gain really acts, in both modes


def test_train_only_dirac_gain_is_documented_noise_absent_in_evaluation():
    strong, weak = torch.randn(3, 20, 8), torch.randn(3, 5, 8)
    sdir = SDIR(p=0.0, gamma=1.0, dirac_in_eval=False)
    torch.testing.assert_close(sdir.train()(strong, weak).weak, dirac_stabilize(weak, 1.0, 1.0))
    assert sdir.eval()(strong, weak).weak is weak


# ---------------------------------------------------------------- masked tokens in every backbone

MULTIMODAL = ("survpath", "mcat", "late_fusion")
GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [2, 9], [1, 5, 8]]
TINY = {
    "dim": 16,
    "attn_dim": 8,
    "head_hidden": 8,
    "pool_hidden": 8,
    "transformer_heads": 2,
    "transformer_ff": 16,
}


@pytest.mark.parametrize("name", MULTIMODAL)
@pytest.mark.parametrize("mask_modalities", ["strong", "both"])
def test_token_variant_masked_tokens_are_excluded_from_attention_and_pooling(name, mask_modalities):
    from fedprog.models import create_model

    torch.manual_seed(15)
    model = create_model(
        {"name": name, **TINY}, group_index=GROUPS, strong_kind="wsi", strong_dim=6, n_outputs=4
    ).eval()
    strong, weak = model.strong_encoder(torch.randn(1, 30, 6)), model.weak_encoder(torch.randn(1, 10))
    sdir = SDIR(
        variant="token", p=0.5, mask_modalities=mask_modalities, gamma=0.0, generator=_gen(16)
    ).train()
    out = sdir(strong, weak, torch.ones(1, 30, dtype=torch.bool))
    assert not out.strong_mask.all() and out.strong_mask.any()
    weak_keep = out.weak_mask[0] if out.weak_mask is not None else torch.ones(5, dtype=torch.bool)
    with torch.no_grad():
        masked = model.fusion(*out)
        # the same bag with the dropped tokens physically removed: no ghost token may have mattered
        compact = model.fusion(
            strong[:, out.strong_mask[0]],
            weak[:, weak_keep],
            torch.ones(1, int(out.strong_mask.sum()), dtype=torch.bool),
        )
    torch.testing.assert_close(masked, compact, rtol=1e-5, atol=1e-6)
    if mask_modalities == "both":
        assert not weak_keep.all()
