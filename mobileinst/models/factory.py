"""The one factory: a registered variant's name -> a freshly initialised MobileInst.

    model = build_model("mobileinst-topformer-t", num_classes=3)

Construction only; pretrained backbone weights are loaded separately
(`mobileinst.models.weights.load_backbone_weights`), trained checkpoints by
`mobileinst.checkpoint.model_from_checkpoint`.
"""
from __future__ import annotations

from typing import Any

from .registry import get_config
from .mobileinst import MobileInst


def build_model(name: str, num_classes: int = 80, **overrides: Any) -> MobileInst:
    """Build a freshly initialised MobileInst variant by name (`mobileinst.models.registry.MODELS`)."""
    return MobileInst(get_config(name, num_classes=num_classes, **overrides))
