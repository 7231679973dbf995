"""Tests for fedprog.models: registry, encoders, every registered backbone, configs, masks and memory."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedprog.models import (
    CADEConfig,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    SDIRConfig,
    create_model,
    list_models,
    register_backbone,
)
from fedprog.models.encoders import GatedAttentionPool, GroupTokenizer, TabularTokenizer, masked_mean
from fedprog.models.sdir import dirac_stabilize
from fedprog.models.survpath import SurvPathFusion
from fedprog.survival.losses import nll_survival_loss

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
UNIMODAL = {"snn", "abmil", "linear_cox"}
GROUP_INDEX = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [2, 9]]
N_GENES = 10
TINY = {
    "dim": 16,
    "attn_dim": 8,
    "head_hidden": 8,
    "pool_hidden": 8,
    "transformer_heads": 2,
    "transformer_ff": 16,
}


@dataclass
class TinyBatch:
    """Same fields as fedprog.data.Batch (architecture.md §2)."""

    case_ids: list[str]
    expression: torch.Tensor
    strong: torch.Tensor
    strong_mask: torch.Tensor
    bins: torch.Tensor
    time: torch.Tensor
    censorship: torch.Tensor


def make_batch(
    kind: str, batch_size: int = 3, n_tokens: int = 12, n_features: int = 6, seed: int = 0
) -> TinyBatch:
    g = torch.Generator().manual_seed(seed)
    if kind == "wsi":
        strong = torch.randn(batch_size, n_tokens, n_features, generator=g)
        mask = torch.ones(batch_size, n_tokens, dtype=torch.bool)
        mask[-1, n_tokens // 2 :] = False  # last bag is padded
        strong[~mask] = 0.0
    else:
        strong = torch.randn(batch_size, n_features, 1, generator=g)
        mask = torch.ones(batch_size, n_features, dtype=torch.bool)
    return TinyBatch(
        case_ids=[f"case-{i}" for i in range(batch_size)],
        expression=torch.randn(batch_size, N_GENES, generator=g),
        strong=strong,
        strong_mask=mask,
        bins=torch.randint(0, 4, (batch_size,), generator=g),
        time=torch.rand(batch_size, generator=g) * 50 + 1,
        censorship=torch.tensor([0.0, 1.0, 0.0])[:batch_size],
    )


def build(name: str, kind: str, *, modules: bool = False, n_outputs: int | None = None, **overrides):
    """A tiny model; ``modules=True`` enables SDIR (default variant) and CADE forced to fire."""
    cfg = {"name": name, **TINY, **overrides}
    if modules:
        cfg["sdir"] = {"enabled": True}
        cfg["cade"] = {"enabled": True, "p_aug": 1.0}
    n_out = n_outputs or (1 if name == "linear_cox" else 4)
    return create_model(cfg, group_index=GROUP_INDEX, strong_kind=kind, strong_dim=6, n_outputs=n_out)


def applicable() -> list[tuple[str, str, bool]]:
    cases = []
    for name in list_models():
        for kind in ("wsi", "tabular"):
            if name == "linear_cox" and kind == "wsi":
                continue
            cases.append((name, kind, False))
            if name not in UNIMODAL:
                cases.append((name, kind, True))
    return cases


def test_registry_lists_the_contract_names():
    assert set(list_models()) >= {"survpath", "mcat", "late_fusion", "snn", "abmil", "linear_cox"}
    assert list_models("*fusion") == ["late_fusion"]


def test_unknown_model_lists_known_names():
    with pytest.raises(
        ModelConfigError, match=r"unknown model.name='transmil'; registered models: \['abmil'"
    ):
        create_model(
            {"name": "transmil"}, group_index=GROUP_INDEX, strong_kind="wsi", strong_dim=6, n_outputs=4
        )


def test_duplicate_registration_is_refused():
    with pytest.raises(ModelConfigError, match="'survpath' is already registered"):
        register_backbone("survpath")(lambda cfg, **kwargs: None)


@pytest.mark.parametrize(
    ("cfg", "kwargs", "match"),
    [
        ({"name": "survpath", "dimm": 3}, {}, r"model: unknown key\(s\) \['dimm'\]"),
        ({"name": "survpath", "sdir": {"prob": 0.2}}, {}, r"model.sdir: unknown key\(s\) \['prob'\]"),
        ({"name": "survpath", "weak_pool": "max"}, {}, "model.weak_pool='max'"),
        ({"name": "survpath", "dropout": 1.0}, {}, r"model.dropout=1.0 must lie in \[0, 1\)"),
        ({"name": "survpath", "sdir": {"enabled": True, "p": 2.0}}, {}, "model.sdir.p=2.0"),
        ({"name": "survpath"}, {"strong_kind": "rna"}, "strong_kind='rna'"),
        ({"name": "survpath"}, {"group_index": [[0], []]}, "empty groups at \\[1\\]"),
        ({"name": "survpath"}, {"n_genes_per_group": [3, 2, 5, 1]}, "n_genes_per_group does not match"),
        (
            {"name": "survpath"},
            {"group_index": []},
            "reads the expression as gene groups, but group_index is empty",
        ),
        ({"name": "mcat"}, {"strong_kind": "none"}, "needs a strong modality \\(wsi or tabular\\)"),
        ({"name": "abmil"}, {"strong_kind": "none"}, "needs a strong modality"),
        ({"name": "snn"}, {"group_index": []}, "group_index is empty"),
        ({"name": "linear_cox"}, {"strong_kind": "wsi", "n_outputs": 1}, "needs a tabular strong modality"),
        ({"name": "linear_cox"}, {"strong_kind": "tabular"}, "n_outputs=4; use training.loss=cox"),
        ({}, {}, "missing key 'name'"),
    ],
)
def test_bad_configs_name_the_key(cfg, kwargs, match):
    args = {"group_index": GROUP_INDEX, "strong_kind": "wsi", "strong_dim": 6, "n_outputs": 4, **kwargs}
    with pytest.raises(ModelConfigError, match=match):
        create_model(cfg, **args)


def test_models_that_ignore_a_modality_accept_its_absence():
    batch = make_batch("tabular")
    no_strong = dataclasses.replace(
        batch, strong=torch.zeros(3, 0, 1), strong_mask=torch.zeros(3, 0, dtype=torch.bool)
    )
    snn = create_model(
        {"name": "snn", **TINY}, group_index=GROUP_INDEX, strong_kind="none", strong_dim=1, n_outputs=4
    )
    assert snn(no_strong).shape == (3, 4)
    for name, n_out in (("abmil", 4), ("linear_cox", 1)):
        model = create_model(
            {"name": name, **TINY}, group_index=[], strong_kind="tabular", strong_dim=6, n_outputs=n_out
        )
        assert model(batch).shape == (3, n_out)


def test_linear_cox_pathway_scores_are_group_means_beside_the_table():
    batch = make_batch("tabular")
    model = create_model(
        {"name": "linear_cox", "pathway_scores": True},
        group_index=GROUP_INDEX,
        strong_kind="tabular",
        strong_dim=6,
        n_outputs=1,
    )
    assert model.linear.in_features == 6 + len(GROUP_INDEX)
    scores = torch.stack([batch.expression[:, group].mean(dim=1) for group in GROUP_INDEX], dim=1)
    features = torch.cat([batch.strong[..., 0], scores], dim=1)
    torch.testing.assert_close(model(batch), model.linear(features))
    assert "averaging" not in model.state_dict()  # fixed by the groups: never sent or aggregated
    with pytest.raises(ModelConfigError, match="pathway_scores=true needs gene groups"):
        create_model(
            {"name": "linear_cox", "pathway_scores": True},
            group_index=[],
            strong_kind="tabular",
            strong_dim=6,
            n_outputs=1,
        )


@pytest.mark.parametrize("name", sorted(UNIMODAL))
def test_unimodal_models_refuse_sdir_and_cade(name):
    with pytest.raises(ModelConfigError, match="use modules=none with this model"):
        build(name, "tabular", modules=True)


@pytest.mark.parametrize(("name", "kind", "modules"), applicable())
def test_forward_backward_and_eval_determinism(name, kind, modules):
    torch.manual_seed(0)
    model = build(name, kind, modules=modules)
    batch = make_batch(kind)
    model.train()
    outputs = model(batch)
    n_out = 1 if name == "linear_cox" else 4
    assert outputs.shape == (3, n_out) and torch.isfinite(outputs).all()
    loss = nll_survival_loss(outputs, batch.bins, batch.censorship) if n_out > 1 else outputs.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("snn", {"snn_input": "groups", "weak_pool": "mean"}),
        ("snn", {"snn_input": "groups", "weak_pool": "abmil"}),
        ("snn", {"snn_layers": 3}),
        ("late_fusion", {"weak_pool": "abmil"}),
        ("survpath", {"projector_act": "relu"}),
        ("mcat", {"coattn_heads": 2, "transformer_layers": 1}),
    ],
)
def test_backbone_options(name, options):
    torch.manual_seed(6)
    model = build(name, "wsi", **options)
    batch = make_batch("wsi")
    model(batch).sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))


def test_snn_over_groups_uses_one_token_per_group():
    model = build("snn", "wsi", snn_input="groups")
    assert model.encoder.n_groups == len(GROUP_INDEX)
    genes = build("snn", "wsi")
    assert genes.encoder[0][0].in_features == N_GENES  # union of the grouped genes


@pytest.mark.parametrize("name", [n for n in list_models() if n not in {"snn", "linear_cox"}])
def test_padding_never_contributes(name):
    torch.manual_seed(1)
    model = build(name, "wsi").eval()
    batch = make_batch("wsi", batch_size=1, n_tokens=9)
    padded = dataclasses.replace(
        batch,
        strong=torch.cat([batch.strong, 100 * torch.randn(1, 5, 6)], dim=1),
        strong_mask=torch.cat([batch.strong_mask, torch.zeros(1, 5, dtype=torch.bool)], dim=1),
    )
    with torch.no_grad():
        torch.testing.assert_close(model(padded), model(batch))


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode with every dropout off (modules active, nothing else random)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout | torch.nn.AlphaDropout):
            module.eval()
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    return model


@pytest.mark.parametrize("name", [n for n in list_models() if n not in UNIMODAL])
def test_modules_are_active_in_training_and_only_the_dirac_gain_remains_in_eval(name):
    torch.manual_seed(2)
    plain = build(name, "wsi")
    with_modules = build(name, "wsi", modules=True)
    with_modules.load_state_dict(plain.state_dict())  # the modules add no weights
    batch = make_batch("wsi")
    plain.eval(), with_modules.eval()
    with torch.no_grad():
        tokens = plain.tokens(batch)
        stabilized = tokens._replace(weak=dirac_stabilize(tokens.weak, 1.0, 1.0))
        expected = plain.head(
            plain.fusion(*stabilized)
        )  # eval: CADE is the identity, SDIR's Dirac gain stays
        torch.testing.assert_close(with_modules(batch), expected)
        assert not torch.allclose(with_modules(batch), plain(batch))
        with_modules.sdir.p = 0.99
        out = with_modules.train().tokens(batch)
    assert with_modules.cade.last_mix  # CADE fired (p_aug = 1)
    dropped = with_modules.sdir.last_dropped
    assert dropped.any() and (out.strong[dropped] == 0).all()  # SDIR switched the strong modality off


@pytest.mark.parametrize("name", [n for n in list_models() if n not in UNIMODAL])
def test_dirac_gain_gives_the_same_model_output_in_training_and_evaluation(name):
    torch.manual_seed(7)
    model = build(name, "wsi", sdir={"enabled": True, "p": 0.0})
    batch = make_batch("wsi")
    with torch.no_grad():
        trained = _no_dropout(model)(batch)
        torch.testing.assert_close(model.eval()(batch), trained)


def test_group_tokenizer_matches_one_snn_per_group():
    torch.manual_seed(3)
    tokenizer = GroupTokenizer(GROUP_INDEX, dim=8, dropout=0.25).eval()
    expression = torch.randn(4, N_GENES)
    tokens = tokenizer(expression)
    assert tokens.shape == (4, len(GROUP_INDEX), 8)
    for g, genes in enumerate(GROUP_INDEX):
        n = len(genes)
        hidden = torch.nn.functional.elu(expression[:, genes] @ tokenizer.weight1[g, :n] + tokenizer.bias1[g])
        expected = torch.nn.functional.elu(hidden @ tokenizer.weight2[g] + tokenizer.bias2[g])
        torch.testing.assert_close(tokens[:, g], expected)
    # padded weight rows are zero and get no gradient, so each group is exactly a Linear(n_g, D)
    tokenizer.train()
    tokenizer(expression).sum().backward()
    assert torch.equal(tokenizer.weight1[1, 2:], torch.zeros(3, 8))
    assert torch.equal(tokenizer.weight1.grad[1, 2:], torch.zeros(3, 8))
    with pytest.raises(ModelInputError, match=r"batch.expression has shape \(4, 5\)"):
        tokenizer(expression[:, :5])


def test_tabular_tokenizer_embeds_value_times_weight_plus_bias():
    tokenizer = TabularTokenizer(n_features=3, dim=4)
    table = torch.tensor([[[2.0], [0.0], [-1.0]]])
    expected = table[0] * tokenizer.weight + tokenizer.bias  # (3, 1) * (3, 4)
    torch.testing.assert_close(tokenizer(table)[0], expected)
    with pytest.raises(ModelInputError, match="batch.strong has 2 tabular features, the model expects 3"):
        tokenizer(torch.zeros(1, 2, 1))


def test_gated_attention_pool_and_masked_mean_ignore_padding():
    torch.manual_seed(4)
    pool = GatedAttentionPool(dim=4, hidden=3)
    tokens = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    pooled, attention = pool(tokens, mask)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    assert torch.equal(attention[1, 2:], torch.zeros(3))
    torch.testing.assert_close(pooled[1], pool(tokens[1:, :2])[0][0])
    torch.testing.assert_close(masked_mean(tokens, mask)[1], tokens[1, :2].mean(dim=0))


def test_survpath_wsi_tokens_never_attend_to_each_other():
    torch.manual_seed(5)
    fusion = SurvPathFusion(dim=8, attn_dim=4, dropout=0.0).eval()
    strong = torch.randn(1, 6, 8, requires_grad=True)
    weak = torch.randn(1, 3, 8)
    out = fusion.attend(strong, weak, torch.ones(1, 6, dtype=torch.bool))
    probe = torch.randn(4)  # LayerNorm outputs sum to a constant, so probe a random direction
    (grad,) = torch.autograd.grad(out[0, 3 + 2] @ probe, strong, retain_graph=True)  # WSI token 2
    others = [i for i in range(6) if i != 2]
    assert torch.equal(grad[0, others], torch.zeros(5, 8))
    assert grad[0, 2].abs().sum() > 0
    (grad_w,) = torch.autograd.grad(out[0, 0] @ probe, strong)  # a pathway token sees every WSI token
    assert (grad_w[0].abs().sum(dim=1) > 0).all()


def test_model_input_errors_name_the_case():
    model = build("survpath", "wsi")
    batch = make_batch("wsi")
    empty = dataclasses.replace(batch, strong_mask=batch.strong_mask.clone())
    empty.strong_mask[1] = False
    with pytest.raises(ModelInputError, match=r"no real token \(empty bag\) for case\(s\) \['case-1'\]"):
        model(empty)
    with pytest.raises(ModelInputError, match="7 features per patch, the model expects 6"):
        model(dataclasses.replace(batch, strong=torch.zeros(3, 12, 7)))


def test_default_survpath_has_the_paper_dimensions():
    cfg = OmegaConf.load(CONFIGS / "model" / "survpath.yaml")
    model = create_model(cfg, group_index=GROUP_INDEX, strong_kind="wsi", strong_dim=768, n_outputs=4)
    head = model.head
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (256, 64, 4)
    assert model.strong_encoder.net[0].weight.shape == (256, 768)
    assert model.sdir is None and model.cade is None


def test_data_batch_is_accepted_when_the_data_package_exists():
    data = pytest.importorskip("fedprog.data")
    batch = make_batch("wsi")
    real = data.Batch(**dataclasses.asdict(batch))
    model = build("survpath", "wsi").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(real), model(batch))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_a_config_with_all_module_keys_disabled(name):
    path = CONFIGS / "model" / f"{name}.yaml"
    assert path.is_file(), f"missing {path}"
    cfg = OmegaConf.load(path)
    parsed = ModelConfig.from_cfg(cfg)
    assert parsed.name == name
    assert set(cfg.sdir) == {f.name for f in dataclasses.fields(SDIRConfig)}
    assert set(cfg.cade) == {f.name for f in dataclasses.fields(CADEConfig)}
    # the YAML blocks carry exactly the documented defaults, disabled
    assert parsed.sdir == SDIRConfig() and parsed.cade == CADEConfig()


@pytest.mark.parametrize(
    ("module", "sdir", "cade"),
    [
        ("none", None, None),
        ("sdir", "modality", None),
        ("sdir_token", "token", None),
        ("cade", None, "style"),
        ("cade_token", None, "token"),
        ("sdir_cade", "modality", "style"),
    ],
)
def test_module_switches(module, sdir, cade):
    path = CONFIGS / "modules" / f"{module}.yaml"
    assert path.read_text().startswith("# @package model")
    merged = OmegaConf.merge(OmegaConf.load(CONFIGS / "model" / "survpath.yaml"), OmegaConf.load(path))
    parsed = ModelConfig.from_cfg(merged)
    assert (parsed.sdir.enabled, parsed.cade.enabled) == (sdir is not None, cade is not None)
    if sdir is not None:
        assert parsed.sdir.variant == sdir
    if cade is not None:
        assert parsed.cade.variant == cade
    assert parsed.sdir.p == 0.5 and parsed.cade.p_aug == 0.3
    model = create_model(merged, group_index=GROUP_INDEX, strong_kind="wsi", strong_dim=6, n_outputs=4)
    assert (model.sdir is not None, model.cade is not None) == (sdir is not None, cade is not None)
    if cade is not None:
        assert type(model.cade).__name__ == {"style": "CADE", "token": "TokenCADE"}[cade]


def test_hydra_composition_when_the_train_config_exists():
    if not (CONFIGS / "train.yaml").is_file():
        pytest.skip("configs/train.yaml (lead) not present yet")
    from fedprog.config import load_config

    cfg = load_config("train", ["model=mcat", "modules=sdir_cade"])
    parsed = ModelConfig.from_cfg(cfg.model)
    assert parsed.name == "mcat" and parsed.sdir.enabled and parsed.cade.enabled


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = """
import json, resource, sys, torch
from types import SimpleNamespace
torch.manual_seed(0)
torch.set_num_threads(2)
from fedprog.models import create_model
name = sys.argv[1]
groups = [list(range(i * 20, i * 20 + 5 + i % 30)) for i in range(331)]
n_genes = max(max(g) for g in groups) + 1
batch = SimpleNamespace(expression=torch.randn(1, n_genes), strong=torch.randn(1, 4096, 1024),
                        strong_mask=torch.ones(1, 4096, dtype=torch.bool))
cfg = {"name": name, "dim": 256, "sdir": {"enabled": True}, "cade": {"enabled": True, "p_aug": 1.0}}
model = create_model(cfg, group_index=groups, strong_kind="wsi", strong_dim=1024, n_outputs=4).train()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(batch).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_increase_mb": (after - before) / 1024}))
"""

MEMORY_LIMIT_MB = 1024  # "far below 2 GB" for one forward + backward step


def _step_memory(name: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, name], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_increase_mb"]


def test_survpath_training_step_on_a_4096_patch_bag_stays_small():
    assert _step_memory("survpath") < MEMORY_LIMIT_MB


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mcat", "late_fusion"])
def test_other_backbones_training_step_on_a_4096_patch_bag_stays_small(name):
    assert _step_memory(name) < MEMORY_LIMIT_MB
