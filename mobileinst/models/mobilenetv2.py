"""MobileNetV2 backbone (width 1.0) in torchvision's state_dict layout.

The module tree follows torchvision's `torchvision/models/mobilenetv2.py` exactly (`features.0`
is a Conv-BN-ReLU6 stem, `features.1..17` the inverted residuals, `features.18` the 1x1 conv to
1280), so torchvision's ImageNet checkpoints (`mobilenet_v2-b0353104.pth`,
`mobilenet_v2-7ebf99e0.pth`) load unchanged with `mobileinst.models.weights.load_backbone_weights`
(their `classifier.1.*` tensors are ignored). torchvision itself is not needed.

For MobileInst (paper Table 1) the stage outputs at strides 8, 16, 32 are X3, X4, X5 and the
last stage, average-pooled to stride 64, is the global feature X6.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import adaptive_avg_pool2d, ceil_half

# torchvision's inverted_residual_setting: expand ratio t, channels c, repeats n, stride s
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# features[a:b] for X2, X3, X4, X5, X6 (strides 4, 8, 16, 32, 32 before the final pooling)
_STAGES = ((0, 4), (4, 7), (7, 14), (14, 18), (18, 19))
# features[:n] at stride <= 2 ** level, for freezing the first levels (detectron2's FREEZE_AT)
_LEVEL_END = {0: 0, 1: 2, 2: 4, 3: 7, 4: 14, 5: 18}


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation: children `0` Conv2d (no bias), `1` BN, `2` ReLU6."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual.

    `conv` = [ConvBNReLU6 1x1 expand (only if t != 1)], ConvBNReLU6 3x3 depthwise, Conv2d 1x1
    project, BN. So keys are conv.0.*, conv.1.*, conv.2.weight, conv.3.* when t != 1 and
    conv.0.*, conv.1.weight, conv.2.* when t == 1. Residual iff stride 1 and inp == oup.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 features returning [X3, X4, X5, X6] at strides 8, 16, 32, 64.

    X3 = features[:7] (32 ch), X4 = features[7:14] (96 ch), X5 = features[14:18] (320 ch),
    X6 = features[18] (1x1 conv to 1280 + BN + ReLU6, stride 32) average-pooled to
    (ceil(H32 / 2), ceil(W32 / 2)).
    """

    # every tensor of an ImageNet checkpoint's `features.*` is required
    optional_key_prefixes: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        inp, last = 32, 1280
        layers: list[nn.Module] = [ConvBNReLU6(3, inp, stride=2)]
        for t, c, n, s in _SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(ConvBNReLU6(inp, last, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.out_channels = (32, 96, 320, 1280)
        self.stride4_channels = 24
        self.frozen_blocks = 0  # features[:frozen_blocks] run without gradient (`freeze`)
        self._init_weights()

    def freeze(self, level: int) -> list[nn.Module]:
        """Fix the blocks at strides <= 2**level (1: the stem's stride 2; 2: up to stride 4, as
        detectron2's FREEZE_AT=2; up to 5). They run under no_grad: no backward through the
        highest-resolution layers. Returns the frozen blocks."""
        if level not in _LEVEL_END:
            raise ValueError(f"freeze level must be in 0..{max(_LEVEL_END)}, got {level}")
        self.frozen_blocks = _LEVEL_END[level]
        frozen = list(self.features[:self.frozen_blocks])
        for m in frozen:
            m.requires_grad_(False)
        return frozen

    def _init_weights(self) -> None:
        """torchvision's init: kaiming normal (fan_out) convs, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, with_stride4: bool = False) -> list[Tensor]:
        """x: (B, 3, H, W) -> [X3 (B, 32, H/8), X4 (B, 96, H/16), X5 (B, 320, H/32), X6 (B, 1280, H/64)],
        with X2 (B, 24, H/4) first when `with_stride4`."""
        outs = []
        for start, end in _STAGES:
            for i in range(start, end):
                with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.frozen_blocks):
                    x = self.features[i](x)
            outs.append(x)
        x6 = outs[-1]  # (B, 1280, H32, W32)
        h, w = x6.shape[-2], x6.shape[-1]
        outs[-1] = adaptive_avg_pool2d(x6, (ceil_half(h), ceil_half(w)))  # (B, 1280, H64, W64)
        return outs if with_stride4 else outs[1:]


def mobilenetv2(variant: str = "1.0") -> MobileNetV2:
    """MobileNetV2 backbone; only width multiplier "1.0" (torchvision's released weights) exists."""
    if str(variant) not in ("1.0", "1", "100"):
        raise ValueError(f"unknown MobileNetV2 variant {variant!r}; only '1.0' is available")
    return MobileNetV2()
