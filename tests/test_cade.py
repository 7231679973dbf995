"""Tests pinning the semantics of CADE (fedprog.models.cade)."""

from __future__ import annotations

import pytest
import torch

from fedprog.models import CADE, ModelConfigError
from fedprog.models.cade import kernel_partner_weights, random_partner_index

EPS = 1e-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and unbiased std (+eps) over channels, computed independently of the module."""
    return x.mean(dim=-1), (x.var(dim=-1, unbiased=True) + EPS).sqrt()


def _tokens(batch: int, n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    scale = torch.rand(batch, n, 1, generator=g) * 3 + 0.5
    shift = torch.randn(batch, n, 1, generator=g) * 2
    return torch.randn(batch, n, dim, generator=g, dtype=torch.float64) * scale + shift


def test_identity_in_eval_mode_and_when_p_aug_is_zero():
    strong, weak = _tokens(2, 30, 8), _tokens(2, 5, 8, seed=1)
    out = CADE(p_aug=1.0).eval()(strong, weak)
    assert out[0] is strong and out[1] is weak
    out = CADE(p_aug=0.0).train()(strong, weak)
    assert out[0] is strong and out[1] is weak


def test_fires_with_probability_p_aug():
    cade = CADE(p_aug=0.3, generator=_gen(1)).train()
    strong, weak = _tokens(1, 4, 4), _tokens(1, 3, 4, seed=1)
    fired = 0
    for _ in range(1000):
        cade(strong, weak)
        fired += cade.last_mix is not None
    assert fired / 1000 == pytest.approx(0.3, abs=0.06)  # 4 standard errors


@pytest.mark.parametrize("partner", ["kernel", "random"])
@pytest.mark.parametrize("path", ["linear", "geometric"])
def test_output_statistics_equal_the_blended_statistics(partner, path):
    cade = CADE(p_aug=1.0, partner=partner, path=path, generator=_gen(2)).train()
    strong, weak = _tokens(2, 40, 64), _tokens(2, 7, 64, seed=1)
    out_strong, out_weak = cade(strong, weak)
    mix = cade.last_mix
    for out, mu_hat, sigma_hat, x in (
        (out_strong, mix.mu_strong, mix.sigma_strong, strong),
        (out_weak, mix.mu_weak, mix.sigma_weak, weak),
    ):
        mu, sigma = _stats(out)
        torch.testing.assert_close(mu, mu_hat[..., 0])
        # std(z) = sqrt(var / (var + eps)) differs from 1 by ~eps / var
        torch.testing.assert_close(sigma, sigma_hat[..., 0], rtol=1e-5, atol=1e-5)
        assert out.shape == x.shape


@pytest.mark.parametrize("partner", ["kernel", "random"])
@pytest.mark.parametrize("path", ["linear", "geometric"])
def test_single_weak_token_is_every_strong_token_partner(partner, path):
    # alpha -> large: Beta(alpha, alpha) concentrates at 1/2, so the target statistics are known by hand.
    cade = CADE(p_aug=1.0, alpha=1e6, partner=partner, path=path, generator=_gen(3)).train()
    strong, weak = _tokens(1, 25, 64), _tokens(1, 1, 64, seed=4)
    out_strong, out_weak = cade(strong, weak)
    mu_s, sigma_s = _stats(strong)
    mu_w, sigma_w = _stats(weak)
    mu_out, sigma_out = _stats(out_strong)
    torch.testing.assert_close(mu_out, 0.5 * (mu_s + mu_w), rtol=0, atol=5e-3)
    expected = 0.5 * (sigma_s + sigma_w) if path == "linear" else (sigma_s * sigma_w).sqrt()
    torch.testing.assert_close(sigma_out, expected, rtol=5e-3, atol=5e-3)


def test_gradients_flow_through_normalized_tokens_only():
    cade = CADE(p_aug=1.0, partner="kernel", generator=_gen(5)).train()
    strong = _tokens(2, 30, 16).requires_grad_(True)
    weak = _tokens(2, 6, 16, seed=1).requires_grad_(True)
    out_strong, out_weak = cade(strong, weak)
    (out_strong.sum() + out_weak.sum()).backward()
    mix = cade.last_mix
    # With detached statistics, d(sum_d y)/dx_d = sigma_hat / sigma for every channel of the token.
    for x, sigma_hat in ((strong, mix.sigma_strong), (weak, mix.sigma_weak)):
        _, sigma = _stats(x.detach())
        expected = (sigma_hat[..., 0] / sigma)[..., None].expand_as(x)
        torch.testing.assert_close(x.grad, expected)


def test_different_token_counts_with_padding_never_partners_or_changes_padding():
    strong, weak = _tokens(2, 300, 16), _tokens(2, 7, 16, seed=1)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 100:] = False
    poisoned = strong.clone()
    poisoned[1, 100:] = 1e4 * torch.randn(200, 16, dtype=torch.float64)  # garbage in the padding
    out_p, weak_p = CADE(p_aug=1.0, partner="kernel", generator=_gen(6)).train()(poisoned, weak, mask)
    out_c, weak_c = CADE(p_aug=1.0, partner="kernel", generator=_gen(6)).train()(strong, weak, mask)
    assert out_p.shape == (2, 300, 16) and weak_p.shape == (2, 7, 16)
    torch.testing.assert_close(weak_p, weak_c)  # padding never reached a weak token
    assert torch.equal(out_p[1, 100:], poisoned[1, 100:])  # padded tokens pass unchanged
    torch.testing.assert_close(out_p[mask], out_c[mask])


def test_random_partners_are_real_tokens_without_replacement():
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, :50], mask[1, :10], mask[2, 5:8] = True, True, True
    index = random_partner_index(7, mask, _gen(7))
    assert index.shape == (3, 7)
    assert mask.gather(1, index).all()
    assert len(set(index[0].tolist())) == 7 and len(set(index[1].tolist())) == 7  # 7 <= real count
    assert set(index[2].tolist()) == {5, 6, 7}  # fewer real tokens than queries: every real one is used


def test_kernel_partner_weights_sum_to_one_and_favor_close_statistics():
    mu_a, ls_a = torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2)
    mu_b, ls_b = torch.tensor([[0.1, 2.9, 50.0, 0.0]]), torch.zeros(1, 4)
    mask_b = torch.tensor([[True, True, True, False]])
    weights = kernel_partner_weights(mu_a, ls_a, mu_b, ls_b, bandwidth=torch.tensor([1.0]), mask_b=mask_b)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(1, 2))
    assert torch.equal(weights[..., 3], torch.zeros(1, 2))  # padded partner
    assert weights[0, 0].argmax() == 0 and weights[0, 1].argmax() == 1
    # by hand: softmax(-d2 / h) with d2 = 0.01, 8.41, 2500 for the first query
    raw = torch.exp(-torch.tensor([0.01, 8.41, 2500.0]))
    torch.testing.assert_close(weights[0, 0, :3], raw / raw.sum())


def test_seeded_generator_reproduces_outputs():
    strong, weak = _tokens(2, 20, 8), _tokens(2, 4, 8, seed=1)
    first = CADE(p_aug=1.0, partner="random", generator=_gen(8)).train()(strong, weak)
    second = CADE(p_aug=1.0, partner="random", generator=_gen(8)).train()(strong, weak)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_fixed_bandwidth_option_runs():
    out, _ = CADE(p_aug=1.0, bandwidth=0.5, generator=_gen(9)).train()(
        _tokens(1, 10, 8), _tokens(1, 3, 8, seed=2)
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p_aug": 1.5}, r"model.cade.p_aug=1.5 must lie in \[0, 1\]"),
        ({"partner": "nearest"}, "model.cade.partner='nearest'"),
        ({"path": "cubic"}, "model.cade.path='cubic'"),
        ({"bandwidth": "mean"}, "model.cade.bandwidth='mean'"),
        ({"alpha": 0.0}, "alpha > 0"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        CADE(**kwargs)
