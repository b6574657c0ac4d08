"""Frozen BatchNorms folded into their convolutions for training steps (a faster step, same math).

A BatchNorm whose statistics and affine are frozen (`freeze_backbone_bn`, the frozen blocks of
`freeze_at`) is a fixed per-channel affine map: y = (conv(x, W) - mean) * s + beta with
s = gamma / sqrt(var + eps). So conv + BN = conv(x, W * s) + (beta - mean * s): one convolution
with a bias instead of a convolution and a pass of the BN over the activation in the forward and
another in the backward. W stays the trained parameter (its gradient is the folded weight's times
s), so the optimisation is the same up to float rounding.

The pair keeps its modules, parameters, buffers and state_dict keys: only their classes change
(`FoldedConv2d` computes the folded convolution, `FoldedBatchNorm2d` passes its input through), so
checkpoints, the EMA and every export see the ordinary model. Applies to the convolution-BN pairs
that are consecutive children of an `nn.Sequential`: every BN of the MobileNetV2, EfficientNet-Lite,
TopFormer and SeaFormer backbones.
"""
from __future__ import annotations

from torch import Tensor, nn


class FoldedConv2d(nn.Conv2d):
    """A Conv2d followed by a frozen BatchNorm (`self.folded_bn`, held outside the module tree)."""

    folded_bn: nn.BatchNorm2d

    def forward(self, x: Tensor) -> Tensor:
        bn = self.folded_bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C,)
        shift = bn.bias - bn.running_mean * scale  # (C,)
        if self.bias is not None:
            shift = shift + self.bias * scale
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), shift)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A frozen BatchNorm whose convolution applies it (`FoldedConv2d`): the identity here."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def fold_frozen_batchnorms(model: nn.Module, frozen: list[nn.Module]) -> int:
    """Fold every BatchNorm2d of `frozen` that directly follows a Conv2d of the same width in an
    nn.Sequential into that convolution (see the module docstring). The BNs must stay frozen:
    parameters without gradient and in eval mode (their running statistics are what is folded).
    Returns the number of pairs folded."""
    frozen_ids = {id(m) for m in frozen}
    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.children())
        for conv, bn in zip(children, children[1:]):
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and id(bn) in frozen_ids
                    and bn.num_features == conv.out_channels and bn.affine and bn.track_running_stats):
                conv.__class__, bn.__class__ = FoldedConv2d, FoldedBatchNorm2d
                object.__setattr__(conv, "folded_bn", bn)  # not a child: the state_dict is unchanged
                folded += 1
    return folded


def unfold_batchnorms(model: nn.Module) -> None:
    """Undo `fold_frozen_batchnorms` (e.g. on a copy made for evaluation or export)."""
    for m in model.modules():
        if type(m) is FoldedConv2d:
            m.__class__ = nn.Conv2d
            object.__delattr__(m, "folded_bn")
        elif type(m) is FoldedBatchNorm2d:
            m.__class__ = nn.BatchNorm2d


