"""Named MobileInst variants: one config per name, built by one factory (`models.factory.build_model`).

The defaults are the light decoder (D = 128, depthwise-separable fusion convolutions, hidden 128,
4 heads, FFN 256); the `-repro` variants use the public reproduction's widths (D = 256, full 3x3
convolutions, hidden 256, 8 heads, FFN 512; Ambitious-idiot/MobileInst-Reproduction
`configs/Base-MobileInst.yaml`), so both can be measured side by side (docs/models.md, docs/design.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import MobileInstError
from .backbones import BACKBONES


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backbone: str  # a key of mobileinst.models.backbones.BACKBONES
    num_classes: int = 80
    mask_dim: int = 128  # D of the mask decoder
    fusion_conv: str = "dw"  # 'dw' (depthwise-separable 3x3) or 'full' (3x3)
    kernel_dim: int = 128  # E: mask-feature channels = kernel length (spec item 2)
    mask_coords: bool = False  # x/y channels into M (SparseInst CoordConv); hurt on the synthetic set (docs/design.md)
    hidden_dim: int = 128  # instance decoder width
    num_heads: int = 4
    ffn_dim: int = 256
    num_queries: int = 100  # N (reproduction config)
    local_pool: int = 8  # F_mask (stride 8) max-pooled by 8 -> 1/64 of the input (paper)
    mask_upsample: int = 2  # mask logits -> stride 4 (SparseInst SCALE_FACTOR 2 from stride 8; 1 from 4)
    mask_stride: int = 8  # M's stride: 8 (paper), or 4 with a lateral from the backbone's stride-4 stage
    mask_pooled_cls: bool = False  # add class logits from M pooled under each query's mask (docs/design.md)
    # add to the objectness a linear map of the mean and spread of M under each query's mask: a mask
    # quality cue for the ranking (Mask Scoring R-CNN's idea, on the pooled features; docs/learning.md)
    mask_pooled_obj: bool = False
    aux_loss: bool = False  # training only: the global layer's queries predict too (deep supervision)
    query_groups: int = 1  # training only: G copies of the queries, each matched on its own (Group DETR)
    query_proposal: bool = False  # queries taken from the image at its top-k class peaks (FastInst)

    def __post_init__(self) -> None:
        if self.mask_stride not in (4, 8) or self.mask_stride != 4 * self.mask_upsample:
            raise MobileInstError(f"{self.name}: mask_stride must be 8 (mask_upsample 2) or 4 "
                                  f"(mask_upsample 1), got {self.mask_stride} / {self.mask_upsample}")
        if self.query_groups < 1:
            raise MobileInstError(f"{self.name}: query_groups must be >= 1, got {self.query_groups}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REPRO = dict(mask_dim=256, fusion_conv="full", hidden_dim=256, num_heads=8, ffn_dim=512)


def _register() -> dict[str, ModelConfig]:
    models = {}
    for backbone in BACKBONES:
        name = f"mobileinst-{backbone}"
        models[name] = ModelConfig(name=name, backbone=backbone)
        models[f"{name}-repro"] = ModelConfig(name=f"{name}-repro", backbone=backbone, **REPRO)
    return models


MODELS: dict[str, ModelConfig] = _register()


def list_models() -> list[str]:
    """Names of every registered variant."""
    return list(MODELS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The named config, with fields overridden (e.g. num_classes=3)."""
    if name not in MODELS:
        raise MobileInstError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    if "mask_stride" in overrides and "mask_upsample" not in overrides:  # one implies the other
        overrides = {**overrides, "mask_upsample": max(1, int(overrides["mask_stride"]) // 4)}
    try:
        return replace(MODELS[name], **overrides)
    except TypeError as e:
        raise MobileInstError(f"bad model option for {name}: {e}") from None
