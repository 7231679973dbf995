"""Tests pinning the semantics of CADE (fedprog.models.cade): the style variant and the token variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprog.models import CADE, ModelConfigError, TokenCADE
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
    out = TokenCADE(p_aug=1.0).eval()(strong, weak)
    assert out[0] is strong and out[1] is weak
    out = TokenCADE(p_aug=0.0).train()(strong, weak)
    assert out[0] is strong and out[1] is weak


def test_fires_with_probability_p_aug():
    cade = TokenCADE(p_aug=0.3, generator=_gen(1)).train()
    strong, weak = _tokens(1, 4, 4), _tokens(1, 3, 4, seed=1)
    fired = 0
    for _ in range(1000):
        cade(strong, weak)
        fired += cade.last_mix is not None
    assert fired / 1000 == pytest.approx(0.3, abs=0.06)  # 4 standard errors


@pytest.mark.parametrize("partner", ["kernel", "random"])
@pytest.mark.parametrize("path", ["linear", "geometric"])
def test_output_statistics_equal_the_blended_statistics(partner, path):
    cade = TokenCADE(p_aug=1.0, partner=partner, path=path, generator=_gen(2)).train()
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
    cade = TokenCADE(p_aug=1.0, alpha=1e6, partner=partner, path=path, generator=_gen(3)).train()
    strong, weak = _tokens(1, 25, 64), _tokens(1, 1, 64, seed=4)
    out_strong, out_weak = cade(strong, weak)
    mu_s, sigma_s = _stats(strong)
    mu_w, sigma_w = _stats(weak)
    mu_out, sigma_out = _stats(out_strong)
    torch.testing.assert_close(mu_out, 0.5 * (mu_s + mu_w), rtol=0, atol=5e-3)
    expected = 0.5 * (sigma_s + sigma_w) if path == "linear" else (sigma_s * sigma_w).sqrt()
    torch.testing.assert_close(sigma_out, expected, rtol=5e-3, atol=5e-3)


def test_gradients_flow_through_normalized_tokens_only():
    cade = TokenCADE(p_aug=1.0, partner="kernel", generator=_gen(5)).train()
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
    out_p, weak_p = TokenCADE(p_aug=1.0, partner="kernel", generator=_gen(6)).train()(poisoned, weak, mask)
    out_c, weak_c = TokenCADE(p_aug=1.0, partner="kernel", generator=_gen(6)).train()(strong, weak, mask)
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
    first = TokenCADE(p_aug=1.0, partner="random", generator=_gen(8)).train()(strong, weak)
    second = TokenCADE(p_aug=1.0, partner="random", generator=_gen(8)).train()(strong, weak)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_fixed_bandwidth_option_runs():
    out, _ = TokenCADE(p_aug=1.0, bandwidth=0.5, generator=_gen(9)).train()(
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
        TokenCADE(**kwargs)


# ================================================================ style variant (default)

from fedprog.models import (  # noqa: E402
    ModelInputError,
    StyleSummary,
    create_model,
    list_models,
    pool_style_summaries,
    sample_style_bank,
)
from fedprog.models.cade import channel_statistics  # noqa: E402


def _bags(batch: int, n: int = 50, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Bags whose channels carry a per-bag shift and scale (the style) over standard-normal content."""
    g = _gen(seed)
    shift = torch.randn(batch, 1, dim, generator=g, dtype=torch.float64) * 3
    scale = torch.rand(batch, 1, dim, generator=g, dtype=torch.float64) * 2 + 0.5
    return torch.randn(batch, n, dim, generator=g, dtype=torch.float64) * scale + shift


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bag, per-channel mean and unbiased std (+eps) over the tokens, independently of the module."""
    return x.mean(dim=1), (x.var(dim=1, unbiased=True) + EPS).sqrt()


def _style(**kwargs) -> CADE:
    return CADE(**{"p_aug": 1.0, "generator": _gen(kwargs.pop("seed", 0)), **kwargs}).train()


def test_style_is_the_default_variant_of_the_config():
    from fedprog.models import CADEConfig, build_cade

    assert isinstance(build_cade(CADEConfig()), CADE)
    assert isinstance(build_cade(CADEConfig(variant="token")), TokenCADE)
    with pytest.raises(ModelConfigError, match="model.cade.variant='patch'"):
        build_cade(CADEConfig(variant="patch"))


def test_style_identity_in_eval_and_eval_never_fills_the_bank():
    cade = _style().eval()
    strong, weak = _bags(3), _bags(3, n=5, seed=1)
    out = cade(strong, weak)
    assert out[0] is strong and out[1] is weak
    assert cade.bank("strong")[0].shape[0] == 0 and cade.style_summary(min_count=1) is None


def test_style_mixes_only_along_the_style_axis():
    # two bags, no bank: each one's only partner is the other one
    cade = _style(bank_size=0, modalities="strong", seed=1)
    strong, weak = _bags(2, seed=2), _bags(2, n=5, seed=3)
    out_strong, out_weak = cade(strong, weak)
    assert out_weak is weak  # modalities="strong"
    mix = cade.last_mix["strong"]
    mu, sigma = _channel_stats(strong)
    lam = mix.lam[:, None]
    assert torch.equal(mix.source, torch.zeros(2, dtype=torch.long))
    # per-channel statistics of the output are the blend of own and partner (the other bag) statistics
    mu_out, sigma_out = _channel_stats(out_strong)
    torch.testing.assert_close(mu_out, lam * mu + (1 - lam) * mu.flip(0))
    torch.testing.assert_close(sigma_out, lam * sigma + (1 - lam) * sigma.flip(0), rtol=1e-5, atol=1e-5)
    # ... so they moved toward the partner's, channel by channel
    assert ((mu_out - mu.flip(0)).abs() <= (mu - mu.flip(0)).abs() + 1e-9).all()
    assert (lam < 0.99).any()  # a real move happened
    # the content relative to the statistics (z) is kept, patch by patch
    z_in = (strong - mu[:, None]) / sigma[:, None]
    z_out = (out_strong - mu_out[:, None]) / sigma_out[:, None]
    torch.testing.assert_close(z_out, z_in, rtol=1e-5, atol=1e-5)


def test_style_statistics_are_per_channel_across_tokens_not_per_token():
    # a per-token shift (same for all channels) is not style: mixing two bags that differ only by it
    # leaves their per-channel scale alone and moves only the channel means
    x = _bags(1, seed=4).repeat(2, 1, 1)
    x[1] += torch.linspace(-1, 1, x.shape[1], dtype=torch.float64)[:, None]  # per-token shift
    mu, sigma, present = channel_statistics(x, None, EPS)
    torch.testing.assert_close(mu, x.mean(dim=1))
    torch.testing.assert_close(sigma, (x.var(dim=1) + EPS).sqrt())
    assert present.all()


def test_style_gradients_flow_through_normalized_tokens_only():
    cade = _style(seed=5)
    strong = _bags(3, seed=6).requires_grad_(True)
    weak = _bags(3, n=6, seed=7).requires_grad_(True)
    out_strong, out_weak = cade(strong, weak)
    (out_strong.sum() + out_weak.sum()).backward()
    for x, mix in ((strong, cade.last_mix["strong"]), (weak, cade.last_mix["weak"])):
        _, sigma = _channel_stats(x.detach())
        expected = (mix.sigma_hat / sigma)[:, None, :].expand_as(x)
        torch.testing.assert_close(x.grad, expected)


def test_style_works_at_batch_size_one_through_the_running_bank():
    cade = _style(alpha=1e6, seed=8)  # lambda = 1/2
    first, second = _bags(1, seed=9), _bags(1, seed=10)
    weak = _bags(1, n=5, seed=11)
    out, _ = cade(first, weak)
    assert torch.equal(out, first)  # an empty bank: no partner, nothing to mix with
    assert cade.last_mix["strong"].source.item() == -1
    out, _ = cade(second, weak)  # the bank now holds the first patient's style
    assert cade.last_mix["strong"].source.item() == 0
    mu1, sigma1 = _channel_stats(first)
    mu2, sigma2 = _channel_stats(second)
    mu_out, sigma_out = _channel_stats(out)
    lam = cade.last_mix["strong"].lam[:, None]
    assert ((lam - 0.5).abs() < 0.01).all()
    torch.testing.assert_close(mu_out, lam * mu2 + (1 - lam) * mu1)
    torch.testing.assert_close(sigma_out, lam * sigma2 + (1 - lam) * sigma1, rtol=1e-5, atol=1e-5)


def test_style_bank_is_a_ring_of_recent_patients_outside_the_state_dict():
    cade = CADE(p_aug=0.0, bank_size=4).train()  # the bank fills even when CADE does not fire
    bags = _bags(10, seed=12)
    for i in range(10):
        cade(bags[i : i + 1], bags[i : i + 1, :5])
    bank_mu, _ = cade.bank("strong")
    expected = {tuple(m.tolist()) for m in _channel_stats(bags[6:])[0]}
    assert {tuple(m.tolist()) for m in bank_mu} == expected
    assert cade.state_dict() == {}  # never exchanged as federated weights
    model = create_model(
        {"name": "survpath", "dim": 8, "attn_dim": 4, "cade": {"enabled": True}},
        group_index=[[0, 1], [2, 3]],
        strong_kind="wsi",
        strong_dim=6,
        n_outputs=4,
    )
    plain = create_model(
        {"name": "survpath", "dim": 8, "attn_dim": 4},
        group_index=[[0, 1], [2, 3]],
        strong_kind="wsi",
        strong_dim=6,
        n_outputs=4,
    )
    assert list(model.state_dict()) == list(plain.state_dict())


def test_style_skips_samples_whose_modality_sdir_switched_off():
    cade = _style(seed=13)
    strong = _bags(3, seed=14)
    strong[1] = 0.0  # SDIR's modality variant zeroed this sample's bag
    out, _ = cade(strong, _bags(3, n=5, seed=15))
    assert torch.equal(out[1], strong[1])
    assert cade.bank("strong")[0].shape[0] == 2  # and its (empty) style never enters the bank


def test_style_leaves_padding_unchanged_and_ignores_it():
    strong = _bags(2, n=40, seed=16)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    poisoned = strong.clone()
    poisoned[1, 25:] = 1e4
    out_p, _ = _style(seed=17)(poisoned, _bags(2, n=5, seed=18), mask)
    out_c, _ = _style(seed=17)(strong, _bags(2, n=5, seed=18), mask)
    assert torch.equal(out_p[1, 25:], poisoned[1, 25:])
    torch.testing.assert_close(out_p[mask], out_c[mask])


def test_style_external_bank_supplies_partners():
    cade = _style(alpha=1e6, external_prob=1.0, modalities="strong", seed=19)
    ext_mu, ext_sigma = torch.full((1, 16), 10.0), torch.full((1, 16), 0.5)
    cade.set_external_bank(ext_mu, ext_sigma, modality="strong")
    strong = _bags(2, seed=20)
    out, _ = cade(strong, _bags(2, n=5, seed=21))
    assert (cade.last_mix["strong"].source == 1).all()
    mu, sigma = _channel_stats(strong)
    mu_out, sigma_out = _channel_stats(out)
    lam = cade.last_mix["strong"].lam[:, None]
    assert ((lam - 0.5).abs() < 0.01).all()
    torch.testing.assert_close(mu_out, lam * mu + (1 - lam) * 10.0)
    torch.testing.assert_close(sigma_out, lam * sigma + (1 - lam) * 0.5, rtol=1e-5, atol=1e-5)
    cade.clear_external_bank("strong")
    cade(strong, _bags(2, n=5, seed=21))
    assert (cade.last_mix["strong"].source == 0).all()


@pytest.mark.parametrize(
    ("mu", "sigma", "match"),
    [
        (torch.zeros(3, 16), torch.ones(2, 16), "one shape"),
        (torch.zeros(3, 16), torch.zeros(3, 16), "sigma finite and > 0"),
        (torch.zeros(16), torch.ones(16), "one shape"),
        (torch.zeros(3, 8), torch.ones(3, 8), "width 8 differs from the tokens' 16"),
    ],
)
def test_set_external_bank_refuses_bad_banks(mu, sigma, match):
    cade = _style()
    cade(_bags(2), _bags(2, n=5, seed=1))  # the tokens' width is known
    with pytest.raises(ModelInputError, match=match):
        cade.set_external_bank(mu, sigma)


def test_style_summary_is_an_aggregate_and_none_below_the_minimum_count():
    cade = CADE(p_aug=0.0, summary_min_count=5, bank_size=2).train()
    bags = _bags(6, seed=22)
    for i in range(4):
        cade(bags[i : i + 1], bags[i : i + 1, :5])
    assert cade.style_summary("strong") is None  # 4 bags < 5: nothing leaves the site
    assert cade.style_summary("strong", min_count=1) is not None
    cade(bags[4:6], bags[4:6, :5])
    summary = cade.style_summary("strong")
    mu, sigma = _channel_stats(bags)
    assert summary.count == 6
    np.testing.assert_allclose(summary.mu_mean, mu.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(summary.mu_var, mu.var(0, unbiased=False).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(summary.log_sigma_mean, sigma.log().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(summary.log_sigma_var, sigma.log().var(0, unbiased=False).numpy(), rtol=1e-5)
    assert set(summary.to_arrays()) == {"count", "mu_mean", "mu_var", "log_sigma_mean", "log_sigma_var"}
    assert StyleSummary.from_arrays(summary.to_arrays()).count == 6
    cade.reset_style_summary()
    assert cade.style_summary("strong", min_count=1) is None


def test_pooled_summaries_equal_the_summary_of_the_union_and_sampled_banks_follow_it():
    bags = _bags(9, seed=23)
    parts = []
    for chunk in (bags[:4], bags[4:]):
        cade = CADE(p_aug=0.0, summary_min_count=1).train()
        cade(chunk, chunk[:, :5])
        parts.append(cade.style_summary("strong"))
    union = CADE(p_aug=0.0, summary_min_count=1).train()
    union(bags, bags[:, :5])
    pooled, expected = pool_style_summaries(parts), union.style_summary("strong")
    assert pooled.count == 9
    for key in ("mu_mean", "mu_var", "log_sigma_mean", "log_sigma_var"):
        np.testing.assert_allclose(getattr(pooled, key), getattr(expected, key), rtol=1e-6, atol=1e-9)
    mu, sigma = sample_style_bank(pooled, 20000, _gen(24))
    assert mu.shape == sigma.shape == (20000, 16) and (sigma > 0).all()
    np.testing.assert_allclose(mu.double().mean(0).numpy(), pooled.mu_mean, atol=0.1)
    np.testing.assert_allclose(sigma.double().log().var(0).numpy(), pooled.log_sigma_var, rtol=0.1, atol=1e-3)


def test_dsu_samples_around_own_statistics_with_the_population_spread():
    bags = _bags(6, seed=25)
    same = bags[:1].repeat(6, 1, 1)
    cade = _style(mode="dsu", seed=26)
    out, _ = cade(same, same[:, :5])  # no spread among identical styles: nothing to sample
    torch.testing.assert_close(out, same)
    out, _ = cade(bags, bags[:, :5])
    mix = cade.last_mix["strong"]
    assert not torch.allclose(mix.mu_hat, mix.mu)
    mu_out, sigma_out = _channel_stats(out)
    torch.testing.assert_close(mu_out, mix.mu_hat)
    z_in = (bags - mix.mu[:, None]) / mix.sigma[:, None]
    torch.testing.assert_close((out - mu_out[:, None]) / sigma_out[:, None], z_in, rtol=1e-4, atol=1e-4)


def test_style_fires_with_probability_p_aug_and_is_reproducible():
    cade = CADE(p_aug=0.3, generator=_gen(27)).train()
    bags = _bags(2, n=6, dim=4, seed=28)
    fired = 0
    for _ in range(1000):
        cade(bags, bags[:, :3])
        fired += bool(cade.last_mix)
    assert fired / 1000 == pytest.approx(0.3, abs=0.06)
    first = _style(seed=29)(bags, bags[:, :3])
    second = _style(seed=29)(bags, bags[:, :3])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "noise"}, "model.cade.mode='noise'"),
        ({"modalities": "rna"}, "model.cade.modalities='rna'"),
        ({"external_prob": 2.0}, r"model.cade.external_prob=2.0 must lie in \[0, 1\]"),
        ({"bank_size": -1}, "bank_size >= 0"),
        ({"summary_min_count": 0}, "summary_min_count >= 1"),
    ],
)
def test_style_invalid_settings_name_the_key(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        CADE(**kwargs)


# ---------------------------------------------------------------- every backbone: the LayerNorm trap

TINY = {
    "dim": 16,
    "attn_dim": 8,
    "head_hidden": 8,
    "pool_hidden": 8,
    "transformer_heads": 2,
    "transformer_ff": 16,
}
GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [2, 9]]


def _styled_batch():
    from types import SimpleNamespace

    g = _gen(30)
    shift, scale = torch.randn(4, 1, 6, generator=g) * 2, torch.rand(4, 1, 6, generator=g) + 0.5
    return SimpleNamespace(
        expression=torch.randn(4, 10, generator=g),
        strong=torch.randn(4, 40, 6, generator=g) * scale + shift,
        strong_mask=torch.ones(4, 40, dtype=torch.bool),
    )


def _bimodal_models() -> list[str]:
    names = []
    for name in list_models():
        try:
            create_model(
                {"name": name, **TINY, "cade": {"enabled": True}},
                group_index=GROUPS,
                strong_kind="wsi" if name != "linear_cox" else "tabular",
                strong_dim=6,
                n_outputs=4 if name != "linear_cox" else 1,
            )
        except ModelConfigError as error:
            assert "use modules=none" in str(error) or "needs a tabular" in str(error)
            continue
        names.append(name)
    return names


def test_every_two_modality_backbone_is_covered():
    assert set(_bimodal_models()) >= {"survpath", "mcat", "late_fusion"}


@pytest.mark.parametrize("name", _bimodal_models())
@pytest.mark.parametrize("kind", ["wsi", "tabular"])
def test_style_cade_changes_the_output_of_every_backbone(name, kind):
    torch.manual_seed(31)
    model = create_model(
        {"name": name, **TINY, "cade": {"enabled": True, "p_aug": 1.0}},
        group_index=GROUPS,
        strong_kind=kind,
        strong_dim=6,
        n_outputs=4,
    ).train()
    for module in model.modules():  # only CADE may differ between the two passes
        if isinstance(module, torch.nn.Dropout | torch.nn.AlphaDropout):
            module.eval()
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0  # attention dropout is a float, not a module
    batch = _styled_batch()
    if kind == "tabular":
        batch.strong, batch.strong_mask = batch.strong[:, :6, :1], batch.strong_mask[:, :6]
    cade, model.cade.generator = model.cade, _gen(32)
    with torch.no_grad():
        on = model(batch)
        model.cade = None
        off = model(batch)
        model.cade = cade
        assert cade.last_mix  # it fired
        torch.testing.assert_close(model.eval()(batch), off)  # identity in evaluation (MCAT: fast path)
    assert ((on - off).norm() / off.norm()).item() > 0.05


def test_style_at_input_restyles_the_patch_features_the_encoder_reads():
    """``position=input``: the strong encoder receives bags whose per-channel statistics are the blend of
    their own and a partner's (the WSI features' own axis), with each patch's content kept; the expression
    tokens are re-styled after their encoder with the same step's draw; evaluation is the identity."""
    torch.manual_seed(41)
    cade_cfg = {"enabled": True, "p_aug": 1.0, "position": "input", "bank_size": 0}
    model = create_model(
        {"name": "survpath", **TINY, "cade": cade_cfg},
        group_index=GROUPS,
        strong_kind="wsi",
        strong_dim=6,
        n_outputs=4,
    ).train()
    model.cade.generator = _gen(42)
    seen = []
    model.strong_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    batch = _styled_batch()
    model(batch)
    restyled, mix = seen[-1], model.cade.last_mix
    assert set(mix) == {"strong", "weak"} and mix["strong"].mu.shape == (4, 6)  # F = 6 input channels
    mu, sigma = _channel_stats(batch.strong.double())
    lam = mix["strong"].lam[:, None].double()
    mu_out, sigma_out = _channel_stats(restyled.double())
    partner_mu = (mix["strong"].mu_hat.double() - lam * mu) / (1 - lam).clamp_min(1e-12)
    torch.testing.assert_close(mu_out, mix["strong"].mu_hat.double(), rtol=1e-4, atol=1e-4)
    assert (lam < 0.99).any() and not torch.allclose(mu_out, mu)
    moved = (lam[:, 0] < 0.99).nonzero()[:, 0]
    assert any(torch.allclose(partner_mu[i], mu[j], atol=1e-3) for i in moved for j in range(4) if j != i)
    z_in = (batch.strong.double() - mu[:, None]) / sigma[:, None]
    z_out = (restyled.double() - mu_out[:, None]) / sigma_out[:, None]
    torch.testing.assert_close(z_out, z_in, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.eval()
        evaluated = model(batch)
        cade, model.cade = model.cade, None
        torch.testing.assert_close(evaluated, model(batch))
        model.cade = cade
    assert torch.equal(seen[-1], batch.strong)  # evaluation: the encoder reads the bag as it is


def test_style_at_input_is_refused_on_a_table():
    config = {"name": "survpath", **TINY, "cade": {"enabled": True, "position": "input"}}
    with pytest.raises(ModelConfigError, match="position=input re-styles WSI patch features"):
        create_model(config, group_index=GROUPS, strong_kind="tabular", strong_dim=6, n_outputs=4)
    config["cade"]["modalities"] = "weak"  # the expression only: allowed on a table
    create_model(config, group_index=GROUPS, strong_kind="tabular", strong_dim=6, n_outputs=4)
    with pytest.raises(ModelConfigError, match="model.cade.position='latent'"):
        CADE(position="latent")
