"""The encoded tokens of both modalities and their masks, as they flow from the encoders to the fusion."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["ModalityTokens"]


class ModalityTokens(NamedTuple):
    """Strong tokens ``[B, Ns, D]``, weak tokens ``[B, Nw, D]`` and their masks (True = a token to use).

    ``weak_mask`` is None when every weak token is used (the usual case: SDIR's token variant with
    ``mask_modalities="both"`` is the only producer of a weak mask).
    """

    strong: Tensor
    weak: Tensor
    strong_mask: Tensor
    weak_mask: Tensor | None = None
