"""Official checkpoint layouts (key -> shape), derived independently of `mobileinst.models`.

Everything here is written from the official configs (hustvl/TopFormer
`local_configs/topformer/topformer_{tiny,small,base}.py`, fudan-zvg/SeaFormer
`seaformer-seg/local_configs/seaformer/seaformer_{tiny,small,base,large}.py`: the `[k, t, c, s]`
rows, channels, embed dims, key dims, heads, MLP ratios) and key naming rules (their
`mmseg/models/backbones/{topformer,seaformer}.py`) and from
torchvision's MobileNetV2 module tree, never from our models' own state_dict, so that a test
comparing the two catches a wrong key or shape in either. `fabricate_checkpoint` builds random
files in these layouts, wrapped and prefixed the way published checkpoints are.
"""
from __future__ import annotations

import argparse

import torch

Layout = dict[str, tuple[int, ...]]

# ------------------------------------------------------------------------------------ spec tables

TOPFORMER = {  # backbones.md, TopFormer "Variants"
    "t": dict(
        rows=[[3, 1, 16, 1], [3, 4, 16, 2], [3, 3, 16, 1], [5, 3, 32, 2], [5, 3, 32, 1],
              [3, 3, 64, 2], [3, 3, 64, 1], [5, 6, 96, 2], [5, 6, 96, 1]],
        channels=[16, 32, 64, 96], out_channels=128, heads=4),
    "s": dict(
        rows=[[3, 1, 16, 1], [3, 4, 24, 2], [3, 3, 24, 1], [5, 3, 48, 2], [5, 3, 48, 1],
              [3, 3, 96, 2], [3, 3, 96, 1], [5, 6, 128, 2], [5, 6, 128, 1], [3, 6, 128, 1]],
        channels=[24, 48, 96, 128], out_channels=192, heads=6),
    "b": dict(
        rows=[[3, 1, 16, 1], [3, 4, 32, 2], [3, 3, 32, 1], [5, 3, 64, 2], [5, 3, 64, 1],
              [3, 3, 128, 2], [3, 3, 128, 1], [5, 6, 160, 2], [5, 6, 160, 1], [3, 6, 160, 1]],
        channels=[32, 64, 128, 160], out_channels=256, heads=8),
}
TOPFORMER_PARAMS = {"t": 1_369_920, "s": 2_968_464, "b": 4_958_048}

SEAFORMER = {  # backbones.md, SeaFormer "Variants"
    "t": dict(
        cfgs=[[[3, 1, 16, 1], [3, 4, 16, 2], [3, 3, 16, 1]], [[5, 3, 32, 2], [5, 3, 32, 1]],
              [[3, 3, 64, 2], [3, 3, 64, 1]], [[5, 3, 128, 2]], [[3, 6, 160, 2]]],
        channels=[16, 16, 32, 64, 128, 160], emb_dims=[128, 160], key_dims=[16, 24],
        depths=[2, 2], heads=4, mlp_ratios=[2, 4]),
    "s": dict(
        cfgs=[[[3, 1, 16, 1], [3, 4, 24, 2], [3, 3, 24, 1]], [[5, 3, 48, 2], [5, 3, 48, 1]],
              [[3, 3, 96, 2], [3, 3, 96, 1]], [[5, 4, 160, 2]], [[3, 6, 192, 2]]],
        channels=[16, 24, 48, 96, 160, 192], emb_dims=[160, 192], key_dims=[16, 24],
        depths=[3, 3], heads=6, mlp_ratios=[2, 4]),
    "b": dict(
        cfgs=[[[3, 1, 16, 1], [3, 4, 32, 2], [3, 3, 32, 1]], [[5, 3, 64, 2], [5, 3, 64, 1]],
              [[3, 3, 128, 2], [3, 3, 128, 1]], [[5, 4, 192, 2]], [[3, 6, 256, 2]]],
        channels=[16, 32, 64, 128, 192, 256], emb_dims=[192, 256], key_dims=[16, 24],
        depths=[4, 4], heads=8, mlp_ratios=[2, 4]),
    "l": dict(
        cfgs=[[[3, 3, 32, 1], [3, 4, 64, 2], [3, 4, 64, 1]], [[5, 4, 128, 2], [5, 4, 128, 1]],
              [[3, 4, 192, 2], [3, 4, 192, 1]], [[5, 4, 256, 2]], [[3, 6, 320, 2]]],
        channels=[32, 64, 128, 192, 256, 320], emb_dims=[192, 256, 320], key_dims=[16, 20, 24],
        depths=[3, 3, 3], heads=8, mlp_ratios=[2, 4, 6]),
}
SEAFORMER_PARAMS = {"t": 1_620_096, "s": 3_912_656, "b": 8_485_664, "l": 13_725_504}
SEAFORMER_ENTRIES = {"t": 426, "s": 558, "b": 690, "l": 762}

# torchvision MobileNetV2 inverted_residual_setting: t, c, n, s
MOBILENETV2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                       [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
MOBILENETV2_FEATURE_PARAMS = 3_504_872 - (1280 * 1000 + 1000)  # torchvision total minus classifier

# ------------------------------------------------------------------------------- building blocks


def make_divisible(v: float, divisor: int = 8) -> int:
    """The official `_make_divisible` (round to a multiple of 8, at most 10% down)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def bn(prefix: str, n: int) -> Layout:
    """BatchNorm2d(n) tensors under `prefix`."""
    out: Layout = {f"{prefix}.{name}": (n,) for name in ("weight", "bias", "running_mean", "running_var")}
    out[f"{prefix}.num_batches_tracked"] = ()
    return out


def conv2d_bn(prefix: str, a: int, b: int, ks: int = 1, groups: int = 1) -> Layout:
    """TopFormer/SeaFormer Conv2d_BN: `c` (conv, no bias) and `bn`."""
    return {f"{prefix}.c.weight": (b, a // groups, ks, ks), **bn(f"{prefix}.bn", b)}


def conv_module(prefix: str, a: int, b: int) -> Layout:
    """mmcv ConvModule(a, b, 1) with BN and no bias: `conv` and `bn`."""
    return {f"{prefix}.conv.weight": (b, a, 1, 1), **bn(f"{prefix}.bn", b)}


def inverted_residual(prefix: str, inp: int, oup: int, k: int, t: int) -> Layout:
    """TopFormer/SeaFormer InvertedResidual: conv.{0,2,4} (t != 1) or conv.{0,2} (t == 1)."""
    hidden = int(round(inp * t))
    out: Layout = {}
    i = 0
    if t != 1:
        out |= conv2d_bn(f"{prefix}.conv.0", inp, hidden, 1)
        i = 2
    out |= conv2d_bn(f"{prefix}.conv.{i}", hidden, hidden, k, groups=hidden)
    out |= conv2d_bn(f"{prefix}.conv.{i + 2}", hidden, oup, 1)
    return out


def mlp(prefix: str, dim: int, hidden: int) -> Layout:
    """Mlp: fc1 Conv2d_BN, dwconv (3x3 depthwise conv with bias), fc2 Conv2d_BN."""
    return {
        **conv2d_bn(f"{prefix}.fc1", dim, hidden),
        f"{prefix}.dwconv.weight": (hidden, 1, 3, 3),
        f"{prefix}.dwconv.bias": (hidden,),
        **conv2d_bn(f"{prefix}.fc2", hidden, dim),
    }


# ------------------------------------------------------------------------------------- TopFormer


def topformer_layout(variant: str, with_sim: bool = True) -> Layout:
    """Official TopFormer backbone state_dict layout (tpm, trans, SIM) for "t", "s" or "b"."""
    cfg = TOPFORMER[variant]
    out: Layout = conv2d_bn("tpm.stem.0", 3, 16, 3)
    inp = 16
    for n, (k, t, c, _s) in enumerate(cfg["rows"], start=1):
        oup = make_divisible(c)
        out |= inverted_residual(f"tpm.layer{n}", inp, oup, k, t)
        inp = oup
    dim, heads, key_dim = sum(cfg["channels"]), cfg["heads"], 16
    nh_kd, dh = key_dim * heads, 2 * key_dim * heads
    for b in range(4):
        p = f"trans.transformer_blocks.{b}"
        out |= conv2d_bn(f"{p}.attn.to_q", dim, nh_kd)
        out |= conv2d_bn(f"{p}.attn.to_k", dim, nh_kd)
        out |= conv2d_bn(f"{p}.attn.to_v", dim, dh)
        out |= conv2d_bn(f"{p}.attn.proj.1", dh, dim)
        out |= mlp(f"{p}.mlp", dim, dim * 2)
    if with_sim:
        for i in (1, 2, 3):  # SIM.0 is an Identity (level 0 not decoded)
            c, o = cfg["channels"][i], cfg["out_channels"]
            for name in ("local_embedding", "global_embedding", "global_act"):
                out |= conv_module(f"SIM.{i}.{name}", c, o)
    return out


def topformer_imagenet_layout(variant: str) -> Layout:
    """An ImageNet classification file: no SIM, plus a classifier (names unpublished; any works)."""
    dim = sum(TOPFORMER[variant]["channels"])
    return topformer_layout(variant, with_sim=False) | {
        "head.bn.weight": (dim,), "head.bn.bias": (dim,),
        "classifier.weight": (1000, dim), "classifier.bias": (1000,)}


# ------------------------------------------------------------------------------------- SeaFormer


def seaformer_layout(variant: str) -> Layout:
    """Official SeaFormer backbone state_dict layout (smb1..smb5, trans1..transK)."""
    cfg = SEAFORMER[variant]
    ch = cfg["channels"]
    out: Layout = conv2d_bn("smb1.stem_block.0", 3, ch[0], 3)
    for i, rows in enumerate(cfg["cfgs"], start=1):
        inp = ch[i - 1]
        for n, (k, t, c, _s) in enumerate(rows, start=1):
            oup = make_divisible(c)
            out |= inverted_residual(f"smb{i}.layer{n}", inp, oup, k, t)
            inp = oup
    for j, dim in enumerate(cfg["emb_dims"], start=1):
        kd = cfg["key_dims"][j - 1]
        nk = kd * cfg["heads"]
        dh = 2 * nk
        for b in range(cfg["depths"][j - 1]):
            p = f"trans{j}.transformer_blocks.{b}"
            out |= conv2d_bn(f"{p}.attn.to_q", dim, nk)
            out |= conv2d_bn(f"{p}.attn.to_k", dim, nk)
            out |= conv2d_bn(f"{p}.attn.to_v", dim, dh)
            out |= conv2d_bn(f"{p}.attn.proj.1", dh, dim)
            out |= conv2d_bn(f"{p}.attn.proj_encode_row.1", dh, dh)
            out |= conv2d_bn(f"{p}.attn.proj_encode_column.1", dh, dh)
            for name in ("rowq", "rowk", "columnq", "columnk"):
                out[f"{p}.attn.pos_emb_{name}.pos_embed"] = (1, nk, 16)
            out |= conv2d_bn(f"{p}.attn.dwconv", 2 * dh, 2 * dh, 3, groups=2 * dh)
            out |= conv2d_bn(f"{p}.attn.pwconv", 2 * dh, dim)
            out |= mlp(f"{p}.mlp", dim, dim * cfg["mlp_ratios"][j - 1])
    return out


def seaformer_imagenet_layout(variant: str) -> Layout:
    """The ImageNet classifier's state_dict: the backbone plus `linear` (1000, C_last)."""
    c_last = SEAFORMER[variant]["channels"][-1]
    return seaformer_layout(variant) | {"linear.weight": (1000, c_last), "linear.bias": (1000,)}


# ----------------------------------------------------------------------------------- MobileNetV2


def _conv_bn_act(prefix: str, a: int, b: int, ks: int, groups: int = 1) -> Layout:
    """torchvision Conv2dNormActivation: `0` conv (no bias), `1` BN (`2` ReLU6 has no keys)."""
    return {f"{prefix}.0.weight": (b, a // groups, ks, ks), **bn(f"{prefix}.1", b)}


def mobilenetv2_layout() -> Layout:
    """torchvision MobileNetV2 (width 1.0) `features.*` layout."""
    out: Layout = _conv_bn_act("features.0", 3, 32, 3)
    inp, idx = 32, 1
    for t, c, n, _s in MOBILENETV2_SETTING:
        for _ in range(n):
            p, hidden, j = f"features.{idx}.conv", inp * t, 0
            if t != 1:
                out |= _conv_bn_act(f"{p}.0", inp, hidden, 1)
                j = 1
            out |= _conv_bn_act(f"{p}.{j}", hidden, hidden, 3, groups=hidden)
            out[f"{p}.{j + 1}.weight"] = (c, hidden, 1, 1)
            out |= bn(f"{p}.{j + 2}", c)
            inp, idx = c, idx + 1
    out |= _conv_bn_act(f"features.{idx}", inp, 1280, 1)
    return out


def mobilenetv2_imagenet_layout() -> Layout:
    """torchvision's mobilenet_v2 checkpoint: features plus classifier.1 (Linear 1280 -> 1000)."""
    return mobilenetv2_layout() | {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}


# ---------------------------------------------------------------------------------- fabrication


def param_count(layout: Layout) -> int:
    """Parameters as the spec counts them: BN running statistics and counters excluded."""
    total = 0
    for key, shape in layout.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        total += int(torch.Size(shape).numel())
    return total


def fabricate_state_dict(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in `layout` (keys in sorted order, so the values depend on the seed only).

    running_var is positive, num_batches_tracked an int64 scalar, everything else N(0, 0.1^2).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(layout):
        shape = layout[key]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(int(torch.randint(1, 10_000, (), generator=g)), dtype=torch.int64)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


def fabricate_checkpoint(
    layout: Layout,
    seed: int = 0,
    wrap: str | None = None,
    prefix: str = "",
    add_classifier: Layout | None = None,
) -> dict:
    """A checkpoint object as published files hold it (pass it to torch.save).

    layout: the backbone keys; add_classifier: extra keys -> shapes (classifier / head tensors);
    prefix: prepended to every key ("module.", "backbone.", "module.backbone."); wrap: None for a
    bare state_dict, or "state_dict" (mmcv-like, with `meta`), "model", or "state_dict_ema" (a timm
    training file: also a different `state_dict` and the argparse `args`, so a loader that does
    not prefer the EMA weights loads the wrong values). The backbone tensors are
    `fabricate_state_dict(layout, seed)`.
    """
    state = fabricate_state_dict(layout, seed)
    if add_classifier:
        state |= fabricate_state_dict(add_classifier, seed + 1000)
    state = {prefix + k: v for k, v in state.items()}
    if wrap is None:
        return state
    if wrap == "state_dict":
        return {"state_dict": state, "meta": {"mmcv_version": "1.3.14", "epoch": 3}}
    if wrap == "model":
        return {"model": state, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    if wrap == "state_dict_ema":
        decoy = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
        return {"epoch": 299, "arch": "SeaFormer", "state_dict": decoy, "state_dict_ema": state,
                "args": argparse.Namespace(lr=0.064, model_ema=True), "version": 2}
    raise ValueError(f"unknown wrap {wrap!r}")
