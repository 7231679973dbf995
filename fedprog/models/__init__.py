"""Models: modality encoders, SDIR and CADE, registered survival backbones and ``create_model``."""

from __future__ import annotations

# Importing the backbone modules registers them (timm style).
from fedprog.models import late_fusion, mcat, survpath, unimodal  # noqa: F401
from fedprog.models.cade import CADE
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

__all__ = [
    "CADE",
    "SDIR",
    "CADEConfig",
    "ModelConfig",
    "ModelConfigError",
    "ModelInputError",
    "MultimodalSurvivalModel",
    "SDIRConfig",
    "create_model",
    "list_models",
    "register_backbone",
]
