"""Semantic-enhanced mask decoder (SEMD) of MobileInst.

Source: the MobileInst paper (Zhang et al., AAAI 2024, arXiv 2303.17594: the semantic-enhanced
mask decoder) and its public reproduction (Ambitious-idiot/MobileInst-Reproduction,
`mobileinst/encoder.py`, `SEMaskEncoder`). It fuses the backbone's local features X3..X5 (strides
8, 16, 32) with the global semantics X6 (stride 64) and returns one stride-8 map F_mask plus the mask features M
that the instance kernels are dotted with.

The width D and the 3x3 convolution type are configurable: the reproduction's widths (D = 256,
full 3x3) cost ~10.8 GMACs at 640, far more than the backbone; our default is D = 128 with
depthwise-separable 3x3 convolutions (spec, "Cost, and the width of the mask decoder").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ConvBNReLU(nn.Sequential):
    """k x k convolution (no bias) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def fusion_conv(dim: int, conv: str) -> nn.Module:
    """The 3x3 Conv-BN-ReLU after every fusion: 'full' 3x3, or 'dw' = depthwise 3x3 + pointwise."""
    if conv == "full":
        return ConvBNReLU(dim, dim, 3)
    if conv == "dw":
        return nn.Sequential(ConvBNReLU(dim, dim, 3, groups=dim), ConvBNReLU(dim, dim, 1))
    raise ValueError(f"unknown conv type {conv!r}: expected 'full' or 'dw'")


def coordinates(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 2, H, W): pixel-centre x and y in (-1, 1), from arange on the map size
    (exports with dynamic shapes)."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1  # (H,)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1  # (W,)
    return torch.cat([xs.view(1, 1, 1, -1).expand(b, 1, h, w),
                      ys.view(1, 1, -1, 1).expand(b, 1, h, w)], 1)


def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """Bilinear resize of x to ref's spatial size (align_corners=False)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class SemanticEnhancer(nn.Module):
    """SE(l, g): the global semantics gate and add to the local features.

    l' = relu(BN(conv1x1(l))), g' = relu(BN(conv1x1(g))), out = relu(BN(conv1x1(l' * g' + g'))).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.local_proj = ConvBNReLU(dim, dim)
        self.global_proj = ConvBNReLU(dim, dim)
        self.out_proj = ConvBNReLU(dim, dim)

    def forward(self, local: Tensor, glob: Tensor) -> Tensor:
        # local, glob: (B, D, H, W) at the same size
        g = self.global_proj(glob)
        return self.out_proj(self.local_proj(local) * g + g)


class SemanticEnhancedMaskDecoder(nn.Module):
    """Backbone features [X3, X4, X5, X6] -> (mask features M at stride 8, F_mask at stride 8)."""

    def __init__(self, in_channels: tuple[int, int, int, int], dim: int = 128, conv: str = "dw",
                 kernel_dim: int = 128, coords: bool = False, project: bool = True) -> None:
        super().__init__()
        c3, c4, c5, c6 = in_channels
        self.lateral3 = ConvBNReLU(c3, dim)
        self.lateral4 = ConvBNReLU(c4, dim)
        self.lateral5 = ConvBNReLU(c5, dim)
        self.lateral_global = ConvBNReLU(c6, dim)
        self.enhance1 = SemanticEnhancer(dim)
        self.enhance2 = SemanticEnhancer(dim)
        # stage 1 (top-down) and stage 2 (bottom-up) fusion convolutions, one per level
        self.top_down = nn.ModuleList(fusion_conv(dim, conv) for _ in range(3))  # p5, p4, p3
        self.bottom_up = nn.ModuleList(fusion_conv(dim, conv) for _ in range(3))  # q3, q4, q5
        # M = conv1x1(F_mask), E channels; with `coords`, two coordinate channels join F_mask first
        # (SparseInst's CoordConv, spec training.md §0): kernels can then tell apart instances
        # that look alike by where they are
        # (project=False: M is made elsewhere, at stride 4 by Stride4MaskFeatures)
        self.coords = coords
        self.mask_proj = nn.Conv2d(dim + 2 * coords, kernel_dim, 1) if project else None

    def forward(self, feats: list[Tensor]) -> tuple[Tensor | None, Tensor]:
        """[X3, X4, X5, X6] -> (M (B, E, H/8, W/8) or None without projection, F_mask (B, D, H/8, W/8))."""
        x3, x4, x5, x6 = feats
        l3, l4, l5 = self.lateral3(x3), self.lateral4(x4), self.lateral5(x5)  # (B, D, H/8..H/32)
        g = resize_to(self.lateral_global(x6), l5)  # (B, D, H/32, W/32)

        # stage 1, top-down
        p5 = self.top_down[0](self.enhance1(l5, g))
        p4 = self.top_down[1](resize_to(p5, l4) + l4)
        p3 = self.top_down[2](resize_to(p4, l3) + l3)
        # stage 2, bottom-up
        q3 = self.bottom_up[0](p3)
        q4 = self.bottom_up[1](resize_to(q3, p4) + p4)
        q5 = self.bottom_up[2](resize_to(q4, p5) + p5)

        out = self.enhance2(q5, g)  # (B, D, H/32, W/32)
        out = resize_to(out, q4) + q4
        f_mask = resize_to(out, q3) + q3  # (B, D, H/8, W/8)
        if self.mask_proj is None:
            return None, f_mask
        m = torch.cat([f_mask, coordinates(f_mask)], 1) if self.coords else f_mask
        return self.mask_proj(m), f_mask  # (B, E, H/8, W/8), (B, D, H/8, W/8)


class Stride4MaskFeatures(nn.Module):
    """Mask features M at stride 4 (model option `mask_stride: 4`), for small objects.

    A lateral from the backbone's stride-4 stage X2 meets F_mask reduced and upsampled from stride
    8, as YOLACT/CondInst/SOLOv2 take P2/P3 into their mask branch; one depthwise-separable fusion,
    then the 1x1 projection to E channels replaces the stride-8 one:

        F4 = fuse(relu(BN(conv1x1(X2))) + up2(relu(BN(conv1x1(F_mask)))))   (B, d, H/4, W/4)
        M  = conv1x1(F4)                                                   (B, E, H/4, W/4)

    d = dim / 2 keeps the stride-4 convolutions cheap (they see 4x the pixels of stride 8)."""

    def __init__(self, stride4_channels: int, dim: int = 128, kernel_dim: int = 128) -> None:
        super().__init__()
        d = dim // 2
        self.lateral = ConvBNReLU(stride4_channels, d)
        self.reduce = ConvBNReLU(dim, d)
        self.fuse = fusion_conv(d, "dw")
        self.mask_proj = nn.Conv2d(d, kernel_dim, 1)

    def forward(self, x2: Tensor, f_mask: Tensor) -> Tensor:
        lat = self.lateral(x2)  # (B, d, H/4, W/4)
        return self.mask_proj(self.fuse(lat + resize_to(self.reduce(f_mask), lat)))  # (B, E, H/4, W/4)
