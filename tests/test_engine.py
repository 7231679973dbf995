import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from data_factory import write_cohort

from fedprog.config import load_config
from fedprog.data import load_cohorts
from fedprog.engine import TrainConfig, eval_batch_size, evaluate, l1_term, train
from fedprog.pipeline import PooledDataset, Preprocessing, build_model, fit_preprocessing, make_dataset


@pytest.fixture()
def two_cohorts(tmp_path):
    write_cohort(tmp_path, "c0", n_cases=24, seed=0)
    layout = write_cohort(tmp_path, "c1", n_cases=16, seed=1)
    cohorts = load_cohorts(layout)
    prep = fit_preprocessing(layout, cohorts, {"c0": cohorts["c0"].case_ids}, n_bins=4)
    return layout, cohorts, prep


def small_model_cfg(name="survpath", **extra):
    return load_config("train", [f"model={name}", "model.dim=16", *extra]).model


def tiny_train_cfg(**overrides):
    values = {"epochs": 3, "grad_accum": 4, "select_on": "last", "lr": 1e-2, "seed": 0}
    return TrainConfig.from_cfg({**values, **overrides})


def test_train_config_rejects_unknown_and_inconsistent_keys():
    with pytest.raises(ValueError, match="unknown key.*'lrr'"):
        TrainConfig.from_cfg({"lrr": 0.1})
    with pytest.raises(ValueError, match="batch_size >= 2"):
        TrainConfig.from_cfg({"loss": "cox", "batch_size": 1})
    with pytest.raises(ValueError, match="optimizer='adagrad'"):
        TrainConfig.from_cfg({"optimizer": "adagrad"})


def test_default_training_config_is_valid():
    TrainConfig.from_cfg(load_config("train").training)


def test_training_lowers_the_loss_and_repeats_exactly(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=16)

    def run():
        torch.manual_seed(123)
        model = build_model(small_model_cfg(), data, loss="nll")
        history = train(model, data, tiny_train_cfg(epochs=8), progress=False)
        return model, history

    model_a, history_a = run()
    model_b, history_b = run()
    assert history_a.epoch_loss[-1] < history_a.epoch_loss[0]
    assert history_a.epoch_loss == history_b.epoch_loss
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_local_steps_count_optimizer_steps(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep)
    model = build_model(small_model_cfg(), data, loss="nll")
    history = train(model, data, tiny_train_cfg(local_steps=7, grad_accum=2), progress=False)
    assert history.n_steps == 7
    assert history.n_examples_seen == 14


def test_proximal_term_keeps_weights_near_the_global_model(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep)
    torch.manual_seed(0)
    start = build_model(small_model_cfg(), data, loss="nll")
    anchor = [p.detach().clone() for p in start.parameters()]

    def drift(mu):
        model = build_model(small_model_cfg(), data, loss="nll")
        model.load_state_dict(start.state_dict())
        train(
            model,
            data,
            tiny_train_cfg(proximal_mu=mu, optimizer="sgd", lr=0.05),
            global_params=anchor,
            progress=False,
        )
        return sum(
            (p.detach() - a).pow(2).sum().item() for p, a in zip(model.parameters(), anchor, strict=True)
        )

    assert drift(5.0) < 0.5 * drift(0.0)


def test_l1_term_sums_weight_matrices_only():
    layer = torch.nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        layer.bias.fill_(7.0)  # not penalized
    assert l1_term(layer).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="training.l1=-0.1"):
        TrainConfig.from_cfg({"l1": -0.1})


def test_l1_penalty_shrinks_the_weights(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=16)
    torch.manual_seed(0)
    start = build_model(small_model_cfg("snn"), data, loss="nll")

    def near_zero(l1):  # share of the weight-matrix entries within two steps (lr 0.01) of zero
        model = build_model(small_model_cfg("snn"), data, loss="nll")
        model.load_state_dict(start.state_dict())
        train(model, data, tiny_train_cfg(l1=l1, epochs=20), progress=False)
        weights = torch.cat([p.detach().abs().flatten() for p in model.parameters() if p.dim() >= 2])
        return (weights < 0.02).float().mean().item()

    plain, penalized = near_zero(0.0), near_zero(1.0)
    assert plain < 0.2 < 0.4 < penalized


def test_evaluate_reports_metrics_for_every_case(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep)
    model = build_model(small_model_cfg(), data, loss="nll")
    result = evaluate(model, data, bins=prep.bins)
    assert result.case_ids == data.case_ids
    assert result.risk.shape == (len(data),)
    assert result.survival.shape == (len(data), prep.bins.n_bins)
    assert np.all(np.diff(result.survival, axis=1) <= 1e-6)  # survival curves never rise
    assert 0.0 <= result.metrics["c_index"] <= 1.0
    assert math.isfinite(result.metrics["loss"])
    assert not data.training  # evaluation leaves the dataset in its previous (eval) mode


def test_cox_loss_with_padded_batches_and_tabular_strong_modality(tmp_path):
    layout = write_cohort(tmp_path, "c0", n_cases=24, with_bags=False)
    layout = type(layout).load({**layout.to_dict(), "strong": "clinical", "features": None})
    cohorts = load_cohorts(layout)
    prep = fit_preprocessing(layout, cohorts, {"c0": cohorts["c0"].case_ids}, n_bins=2)
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep)
    model = build_model(small_model_cfg("late_fusion"), data, loss="cox")
    cfg = tiny_train_cfg(loss="cox", batch_size=8, grad_accum=1, balanced_sampling=False)
    history = train(model, data, cfg, progress=False)
    assert math.isfinite(history.loss)
    result = evaluate(model, data, bins=prep.bins, loss_cfg=cfg)
    assert result.survival.shape == (len(data), 0)
    # tables evaluate in batches (no padding): the same risks as one case at a time
    single = dataclasses.replace(cfg, tabular_eval_batch_size=1)
    one_by_one = evaluate(model, data, bins=prep.bins, loss_cfg=single)
    assert eval_batch_size(cfg, data) == 256 and eval_batch_size(single, data) == 1
    np.testing.assert_allclose(result.risk, one_by_one.risk, rtol=1e-5, atol=1e-6)


def test_preprocessing_round_trips_and_pools(two_cohorts):
    _, cohorts, prep = two_cohorts
    restored = Preprocessing.from_state_dict(prep.state_dict())
    a = make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep)
    b = make_dataset(cohorts["c1"], cohorts["c1"].case_ids, restored)
    assert torch.equal(a[3].expression, b[3].expression)
    pooled = PooledDataset([make_dataset(c, c.case_ids, prep) for c in cohorts.values()])
    assert len(pooled) == 40
    assert pooled[24].case_id == cohorts["c1"].case_ids[0]
    assert pooled.strata().shape == (40,)
    assert pooled.n_events == sum(int((c.labels["censorship"] == 0).sum()) for c in cohorts.values())


def test_preprocessing_is_fitted_on_training_cases_only(two_cohorts):
    _, cohorts, prep = two_cohorts
    assert prep.expression.count == len(cohorts["c0"])  # the target cohort c1 contributed nothing
    times = cohorts["c0"].labels["survival_months"]
    assert prep.bins.edges[0] < times.min() and prep.bins.edges[-1] > times.max()


def _fresh_model(data, seed=7):
    torch.manual_seed(seed)
    return build_model(small_model_cfg(), data, loss="nll")


def test_optimizer_state_is_kept_across_calls_or_reset_per_option(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    cfg = tiny_train_cfg(local_steps=3, optimizer="adam", scheduler="constant")
    first = train(_fresh_model(data), data, cfg, progress=False)
    steps = {k: float(v) for k, v in first.optimizer_state.items() if k.endswith("/step")}
    assert steps and set(steps.values()) == {3.0}
    kept = train(_fresh_model(data), data, cfg, progress=False, optimizer_state=first.optimizer_state)
    assert {float(v) for k, v in kept.optimizer_state.items() if k.endswith("/step")} == {6.0}
    first_moment = next(k for k in first.optimizer_state if k.endswith("exp_avg_sq"))
    assert not torch.equal(kept.optimizer_state[first_moment], first.optimizer_state[first_moment])
    reset_cfg = tiny_train_cfg(
        local_steps=3, optimizer="adam", scheduler="constant", keep_optimizer_state=False
    )
    reset = train(_fresh_model(data), data, reset_cfg, progress=False, optimizer_state=first.optimizer_state)
    assert reset.optimizer_state is None
    # reset: the second call repeats the first exactly (a fresh optimizer from the same weights and seed)
    model_a, model_b = _fresh_model(data), _fresh_model(data)
    train(model_a, data, reset_cfg, progress=False)
    train(model_b, data, reset_cfg, progress=False, optimizer_state=first.optimizer_state)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="training.optimizer='radam'.*kept optimizer state is 'adam'"):
        train(_fresh_model(data), data, tiny_train_cfg(local_steps=1), optimizer_state=first.optimizer_state)


def test_weight_average_returns_the_ema_of_the_step_trajectory(two_cohorts):
    """``weight_average=ema``: the returned weights are the EMA (from the received weights) of the weights
    after each step; the steps themselves, and the kept optimizer state, are those of plain training."""
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    plain = {"optimizer": "adam", "scheduler": "constant", "grad_accum": 2}
    trajectory = [_fresh_model(data).state_dict()]
    for steps in range(1, 6):
        model = _fresh_model(data)
        last = train(model, data, tiny_train_cfg(local_steps=steps, **plain), progress=False)
        trajectory.append(model.state_dict())
    decay = 0.6
    expected = {k: v.clone() for k, v in trajectory[0].items()}
    for weights in trajectory[1:]:
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * weights[k]
    averaged = _fresh_model(data)
    ema_cfg = tiny_train_cfg(local_steps=5, weight_average="ema", ema_decay=decay, **plain)
    history = train(averaged, data, ema_cfg, progress=False)
    moved = 0.0
    for k, v in averaged.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
        moved = max(moved, float((v - trajectory[-1][k]).abs().max()))
    assert moved > 1e-3  # the average is not the last step's weights
    for k, v in history.optimizer_state.items():
        assert torch.equal(v, last.optimizer_state[k])


def test_weight_average_is_what_validation_selects(two_cohorts):
    """With a validation split the selected epoch's averaged weights are returned: the average as it stood
    after that epoch (dropout off, so that validation's draws from the global RNG leave training alone)."""
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    val = make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep, max_patches=8)
    no_dropout = ["model=survpath", "model.dim=16", "model.dropout=0", "model.snn_dropout=0"]

    def fresh():
        torch.manual_seed(7)
        return build_model(load_config("train", no_dropout).model, data, loss="nll")

    plain = {"optimizer": "adam", "scheduler": "constant", "grad_accum": 4, "weight_average": "ema"}
    selected = fresh()
    history = train(selected, data, tiny_train_cfg(epochs=4, select_on="val_loss", **plain), val_data=val)
    assert len(history.val_metrics) == 4
    steps_per_epoch = math.ceil(len(data) / 4)
    after_epoch = fresh()
    train(after_epoch, data, tiny_train_cfg(local_steps=steps_per_epoch * history.selected_epoch, **plain))
    for (key, value), expected in zip(
        selected.state_dict().items(), after_epoch.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, msg=key)


def test_weight_average_leaves_cade_style_banks_to_the_model(two_cohorts):
    """CADE's style banks are buffers sized at their first use: they fill during training and stay outside
    the average (which holds parameters only)."""
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    val = make_dataset(cohorts["c1"], cohorts["c1"].case_ids, prep, max_patches=8)
    for position in ("encoded", "input"):
        cfg = load_config("train", ["model.dim=16", "modules=cade", f"model.cade.position={position}"])
        model = build_model(cfg.model, data, loss="nll")
        config = tiny_train_cfg(epochs=2, select_on="val_c_index", weight_average="ema")
        history = train(model, data, config, val_data=val)
        assert history.selected_epoch in (1, 2)
        assert model.cade.bank("strong")[0].shape[0] > 0 and model.cade.bank("weak")[0].shape[0] > 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("weight_average", "swa", "weight_average='swa'"), ("ema_decay", 1.0, "ema_decay=1.0")],
)
def test_weight_average_settings_are_checked(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_cfg({key: value})


def test_kept_radam_state_leaves_the_warm_up_behind(two_cohorts):
    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    cfg = tiny_train_cfg(local_steps=6, optimizer="radam", scheduler="constant", weight_decay=0.0)

    def change(state):
        model = _fresh_model(data)
        before = [p.detach().clone() for p in model.parameters()]
        history = train(model, data, cfg, progress=False, optimizer_state=state)
        pairs = zip(model.parameters(), before, strict=True)
        moved = sum((p.detach() - b).abs().sum().item() for p, b in pairs)
        return moved, history

    _, warm = change(None)
    for _ in range(2):  # 18 kept steps: past RAdam's rectification threshold (step 6 is still un-rectified)
        _, warm = change(warm.optimizer_state)
    reset_move, _ = change(None)
    kept_move, _ = change(warm.optimizer_state)
    assert kept_move > 2 * reset_move


def test_schedule_continues_across_rounds(two_cohorts):
    from fedprog.engine import RunPosition

    _, cohorts, prep = two_cohorts
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    cfg = tiny_train_cfg(local_steps=4, optimizer="adam", scheduler="cosine", warmup_epochs=0.0, lr=0.1)
    lrs = [
        train(_fresh_model(data), data, cfg, progress=False, run_position=RunPosition(r, 3)).lr_last
        for r in range(3)
    ]
    total = 12  # 3 rounds x 4 local steps: round r's last step is global step 4r + 3
    expected = [0.05 * (1 + math.cos(math.pi * (4 * r + 3) / total)) for r in range(3)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] > lrs[1] > lrs[2]
    single = train(_fresh_model(data), data, cfg, progress=False).lr_last  # one call = the whole run
    assert single == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 4)))
    with pytest.raises(ValueError, match="call index 3 outside 0..2"):
        RunPosition(3, 3)


@pytest.mark.parametrize("keep", [True, False])
def test_client_keeps_its_optimizer_state_in_its_state_folder(tmp_path, keep):
    from fed_helpers import DirectGrid, tiny_config

    from fedprog.federated import client_app
    from fedprog.federated.fitting import describe_sites, fit_preprocessing, initial_weights
    from fedprog.federated.simulation import prepare
    from fedprog.federated.strategy import numpy_to_arrays

    root = tmp_path / "synth"
    overrides = ["training.optimizer=adam", f"training.keep_optimizer_state={str(keep).lower()}"]
    cfg = prepare(tiny_config(root, tmp_path / "out", *overrides, "training.local_steps=2"))
    cfg.run_id = "run1"  # as the ServerApp sets it: the site's state folder is <out>/site_state/<site>/run1
    client_app.clear_caches()
    grid = DirectGrid(int(cfg.expected_sites))
    sites, extra = describe_sites(grid, grid.get_node_ids(), cfg)
    prep = fit_preprocessing(grid, cfg, [s for s in sites if s.role == "train"], extra)
    first = extra[sites[0].site]
    weights = numpy_to_arrays(initial_weights(cfg, prep, first["strong-kind"], first["strong-dim"]))
    context = grid.contexts[grid.node_ids[0]]
    steps = []
    for server_round in (1, 2):
        config = client_app.config_record(
            cfg, **{client_app.PREP_KEY: json.dumps(prep.state_dict()), "server-round": server_round}
        )
        client_app.train_arrays(weights, config, context)
        store = client_app.site_state_store(cfg, context.node_config, sites[0].site)
        kept = store.load_before(server_round + 1)
        steps.append(None if kept is None else float(kept["adam/0/step"]))
    assert steps == ([2.0, 4.0] if keep else [None, None])
    # the site's state folder holds the moments, not the node context (shipped with every simulated message)
    assert client_app.OPTIMIZER_STATE_KEY not in context.state.array_records


def _shift_source(layout, cohort, time_factor, gene_shift):
    """Give ``cohort`` a shorter survival (its own baseline hazard) and expression shifted as a whole."""
    folder = layout.root / cohort
    labels = pd.read_csv(folder / "labels.csv")
    labels["survival_months"] = (labels["survival_months"] * time_factor).round(2)
    labels.to_csv(folder / "labels.csv", index=False)
    rna = pd.read_csv(folder / "rna.csv.gz")
    genes = [c for c in rna.columns if c != "case_id"]
    rna[genes] = rna[genes] + gene_shift
    rna.to_csv(folder / "rna.csv.gz", index=False)


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_stratified_sources_do_not_learn_which_source_a_patient_comes_from(tmp_path, loss):
    write_cohort(tmp_path, "c0", n_cases=40, seed=0, with_bags=False)
    layout = write_cohort(tmp_path, "c1", n_cases=40, seed=1, with_bags=False)
    _shift_source(layout, "c1", time_factor=0.1, gene_shift=2.0)  # c1: 10x the hazard, recognizable genes
    layout = type(layout).load({**layout.to_dict(), "strong": "clinical", "features": None})
    cohorts = load_cohorts(layout)
    cases = {name: cohorts[name].case_ids for name in ("c0", "c1")}
    prep = fit_preprocessing(layout, cohorts, cases, n_bins=4)
    parts = [make_dataset(cohorts[name], ids, prep) for name, ids in cases.items()]
    pooled = PooledDataset(parts)
    np.testing.assert_array_equal(pooled.source_index(parts[1].case_ids[:3]), [1, 1, 1])

    def gap(stratify):
        torch.manual_seed(0)
        model = build_model(small_model_cfg("late_fusion"), pooled, loss=loss)
        batch = {"batch_size": 16, "grad_accum": 1, "balanced_sampling": False} if loss == "cox" else {}
        cfg = tiny_train_cfg(epochs=15, loss=loss, stratify_sources=stratify, **batch)
        train(model, pooled, cfg, progress=False)
        risks = [evaluate(model, part, bins=prep.bins, loss_cfg=cfg).risk for part in parts]
        spread = np.sqrt(np.mean([r.var() for r in risks]))
        return abs(risks[1].mean() - risks[0].mean()) / spread

    plain, stratified = gap(False), gap(True)
    assert plain > 1.0  # unstratified: the pooled model ranks c1 (10x hazard) above c0 by its genes
    assert stratified < 0.5 * plain


def test_stratified_cindex_counts_pairs_within_strata_only():
    from fedprog.survival.metrics import harrell_cindex, stratified_harrell_cindex

    rng = np.random.default_rng(0)
    n = 60
    time, censorship = rng.exponential(10.0, n), (rng.random(n) < 0.3).astype(int)
    strata, risk = rng.integers(0, 3, n), rng.normal(size=n)
    concordant = comparable = 0.0
    for i in range(n):  # brute force: i had the event, j outlived i, same stratum
        for j in range(n):
            if censorship[i] == 0 and time[j] > time[i] and strata[i] == strata[j]:
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    assert stratified_harrell_cindex(time, censorship, risk, strata) == pytest.approx(concordant / comparable)
    assert stratified_harrell_cindex(time, censorship, risk, np.zeros(n)) == pytest.approx(
        harrell_cindex(time, censorship, risk)
    )
    # a risk that only separates the strata scores 0.5 within them
    assert stratified_harrell_cindex(time, censorship, strata.astype(float), strata) == pytest.approx(0.5)
