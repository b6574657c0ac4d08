"""Building blocks shared by the TopFormer and SeaFormer backbones.

Module and child names follow the official releases (hustvl/TopFormer
`mmseg/models/backbones/topformer.py`, fudan-zvg/SeaFormer
`seaformer-seg/mmseg/models/backbones/seaformer.py`; both define the same `Conv2d_BN`,
`InvertedResidual` and `Mlp`), so that their checkpoints load with unchanged keys.
See hustvl/TopFormer `mmseg/models/backbones/topformer.py`: `Conv2d_BN`, `InvertedResidual`, `Mlp`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round v to a multiple of `divisor`, never more than 10% below v (the official `_make_divisible`)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2d_BN(nn.Sequential):  # noqa: N801 (official name)
    """Conv2d without bias followed by BatchNorm2d; children `c` and `bn` (official keys).

    The BN weight starts at `bn_weight_init` (0 on the attention projections, so that a
    fresh residual branch starts small), its bias at 0.
    """

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.bn_weight_init = bn_weight_init
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)


class ConvBN(nn.Sequential):
    """1x1 Conv2d without bias + BatchNorm2d, children `conv` and `bn`.

    The key layout of an mmcv `ConvModule(inp, oup, 1, norm_cfg=BN, act_cfg=None)`, used by
    TopFormer's semantic injection module (and SeaFormer's LightHead fusion blocks).
    """

    def __init__(self, inp: int, oup: int) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(inp, oup, 1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(oup))


class InvertedResidual(nn.Module):
    """MobileNetV2 block with the official `conv` Sequential layout.

    expand_ratio != 1: conv[0] 1x1 expand, [1] act, [2] kxk depthwise, [3] act, [4] 1x1 project;
    expand_ratio == 1: conv[0] depthwise, [1] act, [2] project. hidden = round(inp * t)
    (not rounded to 8); residual iff stride 1 and inp == oup. The activation is ReLU in both
    backbones (the token pyramid / smb stages never receive the backbone's act_layer).
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        ks: int,
        stride: int,
        expand_ratio: float,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        self.out_channels = oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [Conv2d_BN(inp, hidden, ks=1), activation()]
        layers += [
            Conv2d_BN(hidden, hidden, ks=ks, stride=stride, pad=ks // 2, groups=hidden),
            activation(),
            Conv2d_BN(hidden, oup, ks=1),  # linear bottleneck: no activation
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # a Python constant: no branching on tensor values
            return x + self.conv(x)
        return self.conv(x)


class Mlp(nn.Module):
    """TopFormer's convolutional MLP: fc1 (1x1 Conv2d_BN), dwconv (3x3 depthwise, with bias),
    act, fc2 (1x1 Conv2d_BN). No activation between fc1 and dwconv; dropout is always 0 in
    the released configs and is omitted (it has no parameters).
    """

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        self.fc1 = Conv2d_BN(in_features, hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, bias=True, groups=hidden_features)
        self.act = act_layer()
        self.fc2 = Conv2d_BN(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)  # (B, hidden, H, W)
        x = self.act(self.dwconv(x))
        return self.fc2(x)  # (B, C, H, W)


class DropPath(nn.Module):
    """Stochastic depth per sample (training only); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, 1, 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x / keep * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_or_identity(rate: float) -> nn.Module:
    """DropPath(rate), or nn.Identity when rate is 0 (as the official Block does)."""
    return DropPath(rate) if rate > 0.0 else nn.Identity()


def init_weights_official(model: nn.Module) -> None:
    """Fresh initialisation used when no checkpoint is loaded.

    Follows the official `init_weights` (TopFormer and SeaFormer): every conv weight drawn
    from N(0, 2 / fan_out) with fan_out = k * k * out / groups, conv biases 0. For BN, gamma
    is set to the module's `bn_weight_init` (1, or 0 on the attention output projections as
    the official constructors set it; the official `init_weights` would reset those to 1
    too, we keep the zero so that a fresh residual branch starts small) and beta to 0.
    Positional embeddings keep their N(0, 1) draw.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Conv2d_BN):
            nn.init.constant_(m.bn.weight, m.bn_weight_init)
