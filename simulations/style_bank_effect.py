"""Does an installed federated style bank change what the backbone computes? (issue 10, item 2)

Same setting as ``module_effect.py`` (its batch, backbones, seeds, dropout off, CADE forced to fire). Another
site's styles are simulated by the summaries of a batch from other cancers (``make_batch(seed=1)``), pooled
and sampled into a bank exactly as the federation does (:func:`pool_style_summaries`,
:func:`sample_style_bank`, :meth:`CADE.set_external_bank`). For each backbone the printed figure is
``||f_bank - f_nobank|| / ||f_nobank||`` of the fused representation over the batch (same weights, inputs and
CADE generator seed), averaged over ``DRAWS`` draws, at ``external_prob`` 1.0 and the default 0.5, beside
the change of CADE itself (fires vs removed, no bank) for scale.

    python simulations/style_bank_effect.py
"""

from __future__ import annotations

import numpy as np
import torch
from module_effect import DRAWS, Batch, build, make_batch, train_without_dropout
from torch import nn

from fedprog.models import ModelConfigError, list_models
from fedprog.models.cade import pool_style_summaries, sample_style_bank

BANK_SIZE = 64


def other_site_bank(name: str, cade: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per modality, a bank sampled from the pooled style summary of another site's batch."""
    model = train_without_dropout(build(name, {}, {**cade, "p_aug": 0.0}))
    with torch.no_grad():
        model.fused(make_batch(seed=1))
    generator = torch.Generator().manual_seed(7)
    bank = {}
    for modality in ("strong", "weak"):
        summary = pool_style_summaries([model.cade.style_summary(modality, 1)])
        bank[modality] = sample_style_bank(summary, BANK_SIZE, generator)
    return bank


def fused(name: str, cade: dict, batch: Batch, draw: int, bank: dict | None) -> torch.Tensor:
    """The fused representation of a fresh model, CADE seeded by ``draw``, with or without the bank."""
    model: nn.Module = train_without_dropout(build(name, {}, cade))
    if bank is not None:
        for modality, (mu, sigma) in bank.items():
            model.cade.set_external_bank(mu, sigma, modality)
    model.cade.generator = torch.Generator().manual_seed(1000 + draw)
    with torch.no_grad():
        return model.fused(batch)


def main() -> None:
    """Print, per backbone, the relative change due to the bank (and to CADE itself)."""
    torch.set_num_threads(2)
    batch = make_batch()
    print(f"{'backbone':<12}{'bank p=1.0':>14}{'bank p=0.5':>14}{'CADE itself':>14}")
    changes = []
    for name in list_models():
        row = []
        for prob in (1.0, 0.5):
            cade = {"enabled": True, "variant": "style", "p_aug": 1.0, "external_prob": prob}
            try:
                bank = other_site_bank(name, cade)
            except ModelConfigError:
                break
            values = []
            for draw in range(DRAWS):
                off, on = fused(name, cade, batch, draw, None), fused(name, cade, batch, draw, bank)
                values.append(float((on - off).norm() / off.norm()))
            row.append(float(np.mean(values)))
        if not row:
            print(f"{name:<12}{'n/a (unimodal)':>14}")
            continue
        base = {"enabled": True, "variant": "style", "p_aug": 1.0}
        model = train_without_dropout(build(name, {}, base))
        with torch.no_grad():
            on = model.fused(batch)
            model.cade = None
            off = model.fused(batch)
        row.append(float((on - off).norm() / off.norm()))
        changes.append(row[0])
        print(f"{name:<12}" + "".join(f"{v:>14.4f}" for v in row))
    print(f"style_bank_effect: min over backbones {min(changes):.4f} (external_prob=1.0)")


if __name__ == "__main__":
    main()
