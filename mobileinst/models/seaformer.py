"""SeaFormer backbone (Wan et al., ICLR 2023), faithful to the official release.

Source: fudan-zvg/SeaFormer (commit 9718d05), `seaformer-seg/mmseg/models/backbones/seaformer.py`
(the modules) and `seaformer-seg/local_configs/seaformer/seaformer_{tiny,small,base,large}.py`
(the variants); the paper: Wan et al., "SeaFormer", ICLR 2023. The state_dict keys are
exactly the official ones (`smb1..smb5.*`, `trans1..transK.*`), so the ImageNet checkpoints
load unchanged.

    image -> smb1 (stem, stride 4) -> smb2 (8) -> smb3 (16) -> smb4 (32) -> smb5 (64)
    the last K stages are each followed by trans_j (squeeze-enhanced axial attention blocks);
    K = 2 (T/S/B: strides 32, 64) or 3 (L: strides 16, 32, 64).

For MobileInst the backbone returns [x3, x4, x5, x6] = the stage outputs (after their trans
stage, if any) at strides 8, 16, 32, 64 (spec item 9).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .layers import Conv2d_BN, InvertedResidual, Mlp, drop_path_or_identity, init_weights_official, make_divisible

Row = tuple[int, int, int, int]  # (kernel k, expand ratio t, channels c, stride s)


@dataclass(frozen=True)
class SeaFormerConfig:
    """One SeaFormer variant; defaults are the values common to all released configs."""

    cfgs: tuple[tuple[Row, ...], ...]  # five stages of rows [k, t, c, s] -> smb1..smb5
    channels: tuple[int, ...]  # stem width, then the output width of each stage
    emb_dims: tuple[int, ...]  # width of each trans stage (= the width of the stage it follows)
    key_dims: tuple[int, ...]  # key width per head, per trans stage
    depths: tuple[int, ...]  # blocks per trans stage
    num_heads: int
    mlp_ratios: tuple[int, ...] = (2, 4)
    attn_ratio: int = 2
    drop_path_rate: float = 0.1


# Every number from fudan-zvg/SeaFormer seaformer-seg/local_configs/seaformer/seaformer_{tiny,small,
# base,large}.py (the `model = dict(backbone=dict(cfgs=..., channels=..., emb_dims=...))` entries).
SEAFORMER_CONFIGS: dict[str, SeaFormerConfig] = {
    "t": SeaFormerConfig(
        cfgs=(
            ((3, 1, 16, 1), (3, 4, 16, 2), (3, 3, 16, 1)),
            ((5, 3, 32, 2), (5, 3, 32, 1)),
            ((3, 3, 64, 2), (3, 3, 64, 1)),
            ((5, 3, 128, 2),),
            ((3, 6, 160, 2),),
        ),
        channels=(16, 16, 32, 64, 128, 160),
        emb_dims=(128, 160),
        key_dims=(16, 24),
        depths=(2, 2),
        num_heads=4,
    ),
    "s": SeaFormerConfig(
        cfgs=(
            ((3, 1, 16, 1), (3, 4, 24, 2), (3, 3, 24, 1)),
            ((5, 3, 48, 2), (5, 3, 48, 1)),
            ((3, 3, 96, 2), (3, 3, 96, 1)),
            ((5, 4, 160, 2),),
            ((3, 6, 192, 2),),
        ),
        channels=(16, 24, 48, 96, 160, 192),
        emb_dims=(160, 192),
        key_dims=(16, 24),
        depths=(3, 3),
        num_heads=6,
    ),
    "b": SeaFormerConfig(
        cfgs=(
            ((3, 1, 16, 1), (3, 4, 32, 2), (3, 3, 32, 1)),
            ((5, 3, 64, 2), (5, 3, 64, 1)),
            ((3, 3, 128, 2), (3, 3, 128, 1)),
            ((5, 4, 192, 2),),
            ((3, 6, 256, 2),),
        ),
        channels=(16, 32, 64, 128, 192, 256),
        emb_dims=(192, 256),
        key_dims=(16, 24),
        depths=(4, 4),
        num_heads=8,
    ),
    "l": SeaFormerConfig(
        cfgs=(
            ((3, 3, 32, 1), (3, 4, 64, 2), (3, 4, 64, 1)),
            ((5, 4, 128, 2), (5, 4, 128, 1)),
            ((3, 4, 192, 2), (3, 4, 192, 1)),
            ((5, 4, 256, 2),),
            ((3, 6, 320, 2),),
        ),
        channels=(32, 64, 128, 192, 256, 320),
        emb_dims=(192, 256, 320),
        key_dims=(16, 20, 24),
        depths=(3, 3, 3),
        num_heads=8,
        mlp_ratios=(2, 4, 6),
    ),
}


class StackedMV2Block(nn.Module):
    """`smb{i}`: optional stem (3x3 stride-2 Conv2d_BN + ReLU, key `stem_block`), then
    layer1..layerN InvertedResiduals (numbering restarts at 1 in every stage); ReLU throughout.
    """

    def __init__(self, cfgs: tuple[Row, ...], stem: bool, inp_channel: int) -> None:
        super().__init__()
        if stem:
            self.stem_block = nn.Sequential(Conv2d_BN(3, inp_channel, 3, 2, 1), nn.ReLU())
        self.has_stem = stem
        self.num_layers = len(cfgs)
        for i, (k, t, c, s) in enumerate(cfgs):
            oup = make_divisible(c, 8)
            self.add_module(f"layer{i + 1}", InvertedResidual(inp_channel, oup, ks=k, stride=s, expand_ratio=t))
            inp_channel = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.has_stem:
            x = self.stem_block(x)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class SqueezeAxialPositionalEmbedding(nn.Module):
    """Learned (1, dim, 16) embedding, resized to the current length N by 1-D linear
    interpolation (align_corners=False, no antialiasing) at every N, then added (spec item 6).
    """

    def __init__(self, dim: int, shape: int = 16) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, dim, shape))

    def forward(self, x: Tensor) -> Tensor:  # x: (B, dim, N)
        n = x.shape[-1]
        return x + F.interpolate(self.pos_embed, size=n, mode="linear", align_corners=False)


class SeaAttention(nn.Module):
    """Squeeze-enhanced axial attention (official `Sea_Attention`, spec SeaFormer item 5).

    output = h_sigmoid(proj(v + row(q, k, v) + column(q, k, v))) * detail(q, k, v), with the
    kd^-0.5 scale applied (unlike TopFormer's attention).
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.dh = int(attn_ratio * key_dim) * num_heads
        nh_kd = key_dim * num_heads
        self.to_q = Conv2d_BN(dim, nh_kd, 1)
        self.to_k = Conv2d_BN(dim, nh_kd, 1)
        self.to_v = Conv2d_BN(dim, self.dh, 1)

        self.proj = nn.Sequential(act_layer(), Conv2d_BN(self.dh, dim, bn_weight_init=0))
        self.proj_encode_row = nn.Sequential(act_layer(), Conv2d_BN(self.dh, self.dh, bn_weight_init=0))
        self.pos_emb_rowq = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.pos_emb_rowk = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.proj_encode_column = nn.Sequential(act_layer(), Conv2d_BN(self.dh, self.dh, bn_weight_init=0))
        self.pos_emb_columnq = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.pos_emb_columnk = SqueezeAxialPositionalEmbedding(nh_kd, 16)

        # detail enhancement on concat(q, k, v): 2 * dh channels (the segmentation code's width;
        # equal to 2 * nh_kd + dh because attn_ratio is 2 in every released model)
        self.dwconv = Conv2d_BN(2 * self.dh, 2 * self.dh, ks=3, stride=1, pad=1, groups=2 * self.dh)
        self.act = act_layer()
        self.pwconv = Conv2d_BN(2 * self.dh, dim, ks=1)

    def axial(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Multi-head attention along one squeezed axis. q, k: (B, nk, N); v: (B, dh, N) -> (B, dh, N)."""
        b, n = q.shape[0], q.shape[-1]
        q = q.reshape(b, self.num_heads, -1, n).transpose(2, 3)  # (B, h, N, kd), head-major channels
        k = k.reshape(b, self.num_heads, -1, n)  # (B, h, kd, N)
        v = v.reshape(b, self.num_heads, -1, n).transpose(2, 3)  # (B, h, N, d)
        attn = (torch.matmul(q, k) * self.scale).softmax(dim=-1)  # (B, h, N, N)
        out = torch.matmul(attn, v)  # (B, h, N, d)
        return out.transpose(2, 3).reshape(b, self.dh, n)  # (B, dh, N)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # (B, nk, H, W), (B, nk, H, W), (B, dh, H, W)

        detail = self.pwconv(self.act(self.dwconv(torch.cat([q, k, v], dim=1))))  # (B, C, H, W)

        row = self.axial(self.pos_emb_rowq(q.mean(-1)), self.pos_emb_rowk(k.mean(-1)), v.mean(-1))  # (B, dh, H)
        row = self.proj_encode_row(row.unsqueeze(-1))  # (B, dh, H, 1)
        col = self.axial(self.pos_emb_columnq(q.mean(-2)), self.pos_emb_columnk(k.mean(-2)), v.mean(-2))
        col = self.proj_encode_column(col.unsqueeze(-2))  # (B, dh, 1, W)

        s = v + (row + col)  # broadcast to (B, dh, H, W); official order: v.add(row.add(col))
        return ops.h_sigmoid(self.proj(s)) * detail  # (B, C, H, W)


class Block(nn.Module):
    """x + drop_path(attn(x)), then x + drop_path(mlp(x)); ReLU6 inside (spec item 4)."""

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
        self.attn = SeaAttention(dim, key_dim, num_heads, attn_ratio, act_layer)
        self.drop_path = drop_path_or_identity(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """`trans{j}`: a stack of Blocks under the key `transformer_blocks`."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.transformer_blocks:
            x = blk(x)
        return x


class SeaFormer(nn.Module):
    """SeaFormer segmentation backbone with the official key layout (`smb1..5`, `trans1..K`).

    forward(x) -> [x3, x4, x5, x6]: the stage outputs at strides 8, 16, 32, 64 (after the trans
    stage that follows a stage, if any); forward_official(x) -> the official list (stride 8,
    then every trans output). Any input size works (stride-2 convs give ceil(H / 2)).
    """

    optional_key_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg: SeaFormerConfig) -> None:
        super().__init__()
        if len(cfg.cfgs) != 5:
            raise ValueError(f"SeaFormer has five smb stages, got {len(cfg.cfgs)}")
        self.cfg = cfg
        self.num_smb = len(cfg.cfgs)
        self.num_trans = len(cfg.depths)
        for i, rows in enumerate(cfg.cfgs):
            self.add_module(f"smb{i + 1}", StackedMV2Block(rows, stem=i == 0, inp_channel=cfg.channels[i]))
        for j, depth in enumerate(cfg.depths):
            dpr = torch.linspace(0, cfg.drop_path_rate, depth).tolist()  # restarts in every stage
            blocks = [
                Block(cfg.emb_dims[j], cfg.key_dims[j], cfg.num_heads, cfg.mlp_ratios[j], cfg.attn_ratio, r, nn.ReLU6)
                for r in dpr
            ]
            self.add_module(f"trans{j + 1}", BasicLayer(blocks))
        widths = cfg.channels[1:]  # output width of smb1..smb5 (strides 4 .. 64)
        self.out_channels: tuple[int, int, int, int] = tuple(widths[1:5])  # type: ignore[assignment]
        self.strides: tuple[int, int, int, int] = (8, 16, 32, 64)
        init_weights_official(self)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, H, W) -> the five stage outputs at strides 4, 8, 16, 32, 64, each after
        the trans stage that follows it (stage i >= 5 - K is followed by trans i - (5 - K) + 1).
        """
        feats = []
        first_trans = self.num_smb - self.num_trans  # 0-based index of the first stage with trans
        for i in range(self.num_smb):
            x = getattr(self, f"smb{i + 1}")(x)
            if i >= first_trans:
                x = getattr(self, f"trans{i - first_trans + 1}")(x)
            feats.append(x)
        return feats

    def forward_official(self, x: Tensor) -> list[Tensor]:
        """The list the official forward returns: smb2's output (stride 8), then every trans output."""
        feats = self.forward_stages(x)
        first_trans = self.num_smb - self.num_trans
        return [feats[1], *feats[first_trans:]]

    @property
    def stride4_channels(self) -> int:
        return self.channels[1]

    def forward(self, x: Tensor, with_stride4: bool = False) -> list[Tensor]:
        """x: (B, 3, H, W), normalised -> [x3, x4, x5, x6] at strides 8, 16, 32, 64 (with the
        stride-4 stage x2 first when `with_stride4`)."""
        return self.forward_stages(x)[0 if with_stride4 else 1:5]


def seaformer(variant: str) -> SeaFormer:
    """Build SeaFormer-T/S/B/L ("t", "s", "b", "l"), freshly initialised."""
    key = variant.lower().removeprefix("seaformer-").removeprefix("seaformer_")
    if key not in SEAFORMER_CONFIGS:
        raise ValueError(f"unknown SeaFormer variant {variant!r}: expected one of {sorted(SEAFORMER_CONFIGS)}")
    return SeaFormer(SEAFORMER_CONFIGS[key])
