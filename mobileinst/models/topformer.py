"""TopFormer backbone (Zhang et al., CVPR 2022), faithful to the official release.

Source: hustvl/TopFormer, `mmseg/models/backbones/topformer.py` (the modules) and
`local_configs/topformer/topformer_{tiny,small,base}.py` (the variants); the paper: Zhang et al.,
"TopFormer", CVPR 2022. The state_dict keys are exactly the official
ones (`tpm.*`, `trans.*`, `SIM.*`), so the ImageNet checkpoints `topformer-{T,S,B}-224-*.pth`
load unchanged (an ImageNet checkpoint lacks `SIM.*`: see `optional_key_prefixes`).

    image -> tpm (token pyramid, strides 4/8/16/32) -> ppa (pool all to stride 64, concat)
          -> trans (4 attention blocks, global semantics) -> SIM (inject into levels 1..3)

For MobileInst the backbone returns [x3, x4, x5, x6]: the SIM outputs at strides 8, 16, 32
and the `trans` output (stride 64, embed_dim channels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .layers import (
    ConvBN,
    Conv2d_BN,
    InvertedResidual,
    Mlp,
    drop_path_or_identity,
    init_weights_official,
    make_divisible,
)

Row = tuple[int, int, int, int]  # (kernel k, expand ratio t, channels c, stride s)


@dataclass(frozen=True)
class TopFormerConfig:
    """One TopFormer variant; defaults are the values common to all released configs."""

    cfgs: tuple[Row, ...]  # token pyramid rows [k, t, c, s] -> tpm.layer1..layerN
    channels: tuple[int, ...]  # widths of the kept pyramid outputs (sum = embed_dim)
    out_channels: tuple[int | None, ...]  # SIM output widths per level (None: no SIM)
    embed_out_indice: tuple[int, ...]  # layer indices (0-based) kept, strides 4, 8, 16, 32
    num_heads: int
    decode_out_indices: tuple[int, ...] = (1, 2, 3)
    depths: int = 4
    key_dim: int = 16
    attn_ratio: int = 2
    mlp_ratio: int = 2
    c2t_stride: int = 2
    drop_path_rate: float = 0.1
    stem_channels: int = 16

    @property
    def embed_dim(self) -> int:
        return sum(self.channels)


# Every number from hustvl/TopFormer local_configs/topformer/topformer_{tiny,small,base}.py
# (the `model = dict(backbone=dict(cfgs=..., channels=..., out_channels=...))` entries).
TOPFORMER_CONFIGS: dict[str, TopFormerConfig] = {
    "t": TopFormerConfig(
        cfgs=(
            (3, 1, 16, 1), (3, 4, 16, 2), (3, 3, 16, 1), (5, 3, 32, 2), (5, 3, 32, 1),
            (3, 3, 64, 2), (3, 3, 64, 1), (5, 6, 96, 2), (5, 6, 96, 1),
        ),
        channels=(16, 32, 64, 96),
        out_channels=(None, 128, 128, 128),
        embed_out_indice=(2, 4, 6, 8),
        num_heads=4,
    ),
    "s": TopFormerConfig(
        cfgs=(
            (3, 1, 16, 1), (3, 4, 24, 2), (3, 3, 24, 1), (5, 3, 48, 2), (5, 3, 48, 1),
            (3, 3, 96, 2), (3, 3, 96, 1), (5, 6, 128, 2), (5, 6, 128, 1), (3, 6, 128, 1),
        ),
        channels=(24, 48, 96, 128),
        out_channels=(None, 192, 192, 192),
        embed_out_indice=(2, 4, 6, 9),
        num_heads=6,
    ),
    "b": TopFormerConfig(
        cfgs=(
            (3, 1, 16, 1), (3, 4, 32, 2), (3, 3, 32, 1), (5, 3, 64, 2), (5, 3, 64, 1),
            (3, 3, 128, 2), (3, 3, 128, 1), (5, 6, 160, 2), (5, 6, 160, 1), (3, 6, 160, 1),
        ),
        channels=(32, 64, 128, 160),
        out_channels=(None, 256, 256, 256),
        embed_out_indice=(2, 4, 6, 9),
        num_heads=8,
    ),
}


class TokenPyramidModule(nn.Module):
    """`tpm`: stem (3x3 stride-2 Conv2d_BN + ReLU) then layer1..layerN; ReLU throughout."""

    def __init__(self, cfgs: tuple[Row, ...], out_indices: tuple[int, ...], inp_channel: int = 16) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.stem = nn.Sequential(Conv2d_BN(3, inp_channel, 3, 2, 1), nn.ReLU())
        self.num_layers = len(cfgs)
        for i, (k, t, c, s) in enumerate(cfgs):
            oup = make_divisible(c, 8)
            self.add_module(f"layer{i + 1}", InvertedResidual(inp_channel, oup, ks=k, stride=s, expand_ratio=t))
            inp_channel = oup

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        x = self.stem(x)  # (B, 16, H/2, W/2)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return outs  # strides 4, 8, 16, 32


class PyramidPoolAgg(nn.Module):
    """`ppa` (no parameters): average-pool every pyramid level to the stride-32 map's size / 2
    (i.e. (H32 - 1) // 2 + 1, stride 64) and concatenate on channels.

    Uses `ops.adaptive_avg_pool2d` (exactly F.adaptive_avg_pool2d, ONNX-friendly) with the
    output size computed from tensor shapes so that it stays symbolic when exported.
    """

    def forward(self, inputs: list[Tensor]) -> Tensor:
        h = ops.ceil_half(inputs[-1].shape[-2])  # c2t_stride = 2
        w = ops.ceil_half(inputs[-1].shape[-1])
        return torch.cat([ops.adaptive_avg_pool2d(x, (h, w)) for x in inputs], dim=1)  # (B, embed_dim, h, w)


class Attention(nn.Module):
    """Multi-head self-attention on a (B, C, H, W) map with 1x1 Conv2d_BN projections.

    Quirk of the official code (spec TopFormer item 3): the 1/sqrt(key_dim) scale is NOT
    applied, softmax(q k^T) is used as is. Reproduced here.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)  # value width per head
        self.dh = self.d * num_heads
        nh_kd = key_dim * num_heads
        self.to_q = Conv2d_BN(dim, nh_kd, 1)
        self.to_k = Conv2d_BN(dim, nh_kd, 1)
        self.to_v = Conv2d_BN(dim, self.dh, 1)
        self.proj = nn.Sequential(act_layer(), Conv2d_BN(self.dh, dim, bn_weight_init=0))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q = self.to_q(x).reshape(b, self.num_heads, self.key_dim, -1).transpose(2, 3)  # (B, h, HW, kd)
        k = self.to_k(x).reshape(b, self.num_heads, self.key_dim, -1)  # (B, h, kd, HW)
        v = self.to_v(x).reshape(b, self.num_heads, self.d, -1).transpose(2, 3)  # (B, h, HW, d)
        attn = torch.matmul(q, k).softmax(dim=-1)  # (B, h, HW, HW); no scaling (official)
        out = torch.matmul(attn, v)  # (B, h, HW, d)
        out = out.transpose(2, 3).reshape(b, self.dh, h, w)  # heads back head-major
        return self.proj(out)  # (B, C, H, W)


class Block(nn.Module):
    """x + drop_path(attn(x)), then x + drop_path(mlp(x)); BN only inside Conv2d_BN."""

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attn_ratio: int,
        drop_path: float,
        act_layer: type[nn.Module],
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, act_layer)
        self.drop_path = drop_path_or_identity(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """`trans`: a stack of Blocks under the key `transformer_blocks`."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.transformer_blocks:
            x = blk(x)
        return x


class InjectionMultiSum(nn.Module):
    """Semantic injection (`muli_sum`): local_embedding(x_l) * up(h_sigmoid(global_act(x_g)))
    + up(global_embedding(x_g)); up = bilinear, align_corners=False, to x_l's size.
    """

    def __init__(self, inp: int, oup: int) -> None:
        super().__init__()
        self.local_embedding = ConvBN(inp, oup)
        self.global_embedding = ConvBN(inp, oup)
        self.global_act = ConvBN(inp, oup)

    def forward(self, x_l: Tensor, x_g: Tensor) -> Tensor:
        size = x_l.shape[-2:]
        local_feat = self.local_embedding(x_l)  # (B, oup, H, W)
        gate = F.interpolate(ops.h_sigmoid(self.global_act(x_g)), size=size, mode="bilinear", align_corners=False)
        global_feat = F.interpolate(self.global_embedding(x_g), size=size, mode="bilinear", align_corners=False)
        return local_feat * gate + global_feat


class TopFormer(nn.Module):
    """TopFormer backbone with the official key layout (`tpm`, `ppa`, `trans`, `SIM`).

    forward(x) -> [x3, x4, x5, x6]: SIM outputs at strides 8, 16, 32 (out_channels[1:] of the
    config) and the global semantics (the `trans` output, stride 64, embed_dim channels).
    Any input whose sides are multiples of 32 works; multiples of 64 make the pooling exact
    averages with kernel = stride.
    """

    # An ImageNet classification checkpoint lacks SIM (it belongs to the segmentation model):
    # a loader may report these keys as "initialised fresh" instead of failing.
    optional_key_prefixes: tuple[str, ...] = ("SIM.",)

    def __init__(self, cfg: TopFormerConfig) -> None:
        super().__init__()
        if cfg.c2t_stride != 2:
            raise ValueError(f"only c2t_stride=2 is released and supported, got {cfg.c2t_stride}")
        if tuple(cfg.decode_out_indices) != (1, 2, 3):
            raise ValueError(f"MobileInst needs SIM levels (1, 2, 3), got {cfg.decode_out_indices}")
        self.cfg = cfg
        self.channels = tuple(cfg.channels)
        self.decode_out_indices = tuple(cfg.decode_out_indices)

        self.tpm = TokenPyramidModule(cfg.cfgs, cfg.embed_out_indice, cfg.stem_channels)
        self.ppa = PyramidPoolAgg()
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depths).tolist()  # stochastic depth rule
        self.trans = BasicLayer([
            Block(cfg.embed_dim, cfg.key_dim, cfg.num_heads, cfg.mlp_ratio, cfg.attn_ratio, dpr[i], nn.ReLU6)
            for i in range(cfg.depths)
        ])
        self.SIM = nn.ModuleList([
            InjectionMultiSum(c, o) if i in self.decode_out_indices else nn.Identity()
            for i, (c, o) in enumerate(zip(cfg.channels, cfg.out_channels))
        ])
        sim_channels = tuple(int(cfg.out_channels[i]) for i in self.decode_out_indices)
        self.out_channels: tuple[int, int, int, int] = (*sim_channels, cfg.embed_dim)  # type: ignore[assignment]
        self.strides: tuple[int, int, int, int] = (8, 16, 32, 64)
        init_weights_official(self)

    @property
    def stride4_channels(self) -> int:
        return self.channels[0]

    def forward_features(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """x: (B, 3, H, W) -> (SIM outputs at strides 8/16/32, trans output at stride 64,
        the token pyramid's stride-4 level)."""
        tokens = self.tpm(x)  # strides 4, 8, 16, 32; widths cfg.channels
        glob = self.trans(self.ppa(tokens))  # (B, embed_dim, H/64, W/64)
        glob_split = glob.split(list(self.channels), dim=1)
        local = [self.SIM[i](tokens[i], glob_split[i]) for i in self.decode_out_indices]
        return local, glob, tokens[0]

    def forward_official(self, x: Tensor) -> list[Tensor]:
        """The list the official forward returns: the SIM outputs (golden `local_outputs`)."""
        return self.forward_features(x)[0]

    def forward(self, x: Tensor, with_stride4: bool = False) -> list[Tensor]:
        """x: (B, 3, H, W), normalised -> [x3, x4, x5, x6] at strides 8, 16, 32, 64 (with the
        stride-4 tokens x2 first when `with_stride4`)."""
        local, glob, x2 = self.forward_features(x)
        return [x2, *local, glob] if with_stride4 else [*local, glob]


def topformer(variant: str) -> TopFormer:
    """Build TopFormer-T/S/B ("t", "s", "b"), freshly initialised."""
    key = variant.lower().removeprefix("topformer-").removeprefix("topformer_")
    if key not in TOPFORMER_CONFIGS:
        raise ValueError(f"unknown TopFormer variant {variant!r}: expected one of {sorted(TOPFORMER_CONFIGS)}")
    return TopFormer(TOPFORMER_CONFIGS[key])
