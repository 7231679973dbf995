"""Models: modality encoders, SDIR and CADE, registered survival backbones and ``create_model``."""

from __future__ import annotations

# Importing the backbone modules registers them (timm style).
from fedprog.models import late_fusion, mcat, survpath, unimodal  # noqa: F401
from fedprog.models.cade import (
    CADE,
    StyleSummary,
    TokenCADE,
    build_cade,
    pool_style_summaries,
    sample_style_bank,
)
from fedprog.models.model import MultimodalSurvivalModel
from fedprog.models.registry import (
    CADEConfig,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    SDIRConfig,
    create_model,
    list_models,
    register_backbone,
)
from fedprog.models.sdir import SDIR
from fedprog.models.tokens import ModalityTokens

__all__ = [
    "CADE",
    "SDIR",
    "CADEConfig",
    "ModalityTokens",
    "ModelConfig",
    "ModelConfigError",
    "ModelInputError",
    "MultimodalSurvivalModel",
    "SDIRConfig",
    "StyleSummary",
    "TokenCADE",
    "build_cade",
    "create_model",
    "list_models",
    "pool_style_summaries",
    "register_backbone",
    "sample_style_bank",
]
