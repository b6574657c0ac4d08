"""Inference-only speed-ups that keep the outputs the same: Conv-BN fusion, channels-last.

    fused = fuse_conv_bn(model)          # a copy; the original is untouched
    fused.forward_raw(images)            # == model.forward_raw(images) up to float rounding

Every BatchNorm2d of MobileInst directly follows a Conv2d inside an nn.Sequential (Conv2d_BN,
ConvBN, ConvBNReLU, MobileNetV2's blocks, EfficientNet-Lite's blocks, stem and head), so fusion
folds the BN's affine transform into that
convolution and replaces the BN by nn.Identity. The fused copy is for inference and export only:
its state_dict lacks the BN keys, so never save it as a checkpoint (`is_fused(m)` tells).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def fuse_conv_bn_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to bn(conv(x)) with bn in eval mode.

    w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta;
    computed in float64 so the fused weights round only once.
    """
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight.device, conv.weight.dtype)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C_out,)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(conv.weight.dtype))
    return fused


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d in an nn.Sequential; returns the model in eval mode.

    inplace=False (default) fuses a deep copy. BatchNorms elsewhere (none in MobileInst) are left
    as they are. Eval only: the fused model must not be trained or saved as a checkpoint.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = [n for n, _ in seq.named_children()]
        for prev, name in zip(names, names[1:]):
            conv, bn = getattr(seq, prev), getattr(seq, name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                setattr(seq, prev, fuse_conv_bn_pair(conv, bn))
                setattr(seq, name, nn.Identity())
    model.fused = True  # marker: inference/export only
    return model


def is_fused(model: nn.Module) -> bool:
    """True for a model returned by fuse_conv_bn (its state_dict is not a checkpoint's)."""
    return bool(getattr(model, "fused", False))


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights in channels-last memory format (in place). Feed images with
    `images.contiguous(memory_format=torch.channels_last)`. Same outputs up to float rounding.
    benchmarks/latency.py --backends eager eager-cl measures it: on a 2-core AVX-512 Xeon, eager
    TopFormer-T / SeaFormer-T at 640 on 1 thread went 76 -> 69 ms and 79 -> 69 ms (~10%)."""
    return model.to(memory_format=torch.channels_last)
