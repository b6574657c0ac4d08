"""Backbone factory: every backbone returns [X3, X4, X5, X6] at strides 8, 16, 32, 64.

Each backbone keeps the official state_dict layout of its release, so an official ImageNet
checkpoint loads unchanged with `mobileinst.models.weights.load_backbone_weights`.
"""
from __future__ import annotations

from torch import nn

from .efficientnet_lite import efficientnet_lite
from .mobilenetv2 import mobilenetv2
from .seaformer import seaformer
from .topformer import topformer


def _topformer(variant: str) -> nn.Module:
    return topformer(variant)


def _seaformer(variant: str) -> nn.Module:
    return seaformer(variant)


def _mobilenetv2(variant: str) -> nn.Module:
    return mobilenetv2(variant)


def _efficientnet_lite(variant: str) -> nn.Module:
    return efficientnet_lite(variant)


# name -> (constructor, variant); names are the user-facing backbone names
BACKBONES = {
    "topformer-t": (_topformer, "t"),
    "topformer-s": (_topformer, "s"),
    "topformer-b": (_topformer, "b"),
    "seaformer-t": (_seaformer, "t"),
    "seaformer-s": (_seaformer, "s"),
    "seaformer-b": (_seaformer, "b"),
    "seaformer-l": (_seaformer, "l"),
    "mobilenetv2": (_mobilenetv2, "1.0"),
    "efficientnet-lite0": (_efficientnet_lite, "0"),
}


def build_backbone(name: str) -> nn.Module:
    """Build a backbone by name (see BACKBONES), freshly initialised."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    make, variant = BACKBONES[name]
    return make(variant)
