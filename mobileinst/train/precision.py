"""Which precision a training run uses: `amp` true, false or 'auto'.

bf16 autocast speeds a CPU step only where the CPU computes bf16 natively: on this recipe's
model (MobileNetV2, stride-4 masks, 2 threads) an AMD EPYC Zen 4 with AVX512-BF16 ran a step
1.2x faster (docs/learning.md); without AVX512-BF16 or AMX, oneDNN emulates bf16 and the step
gets slower. So 'auto' turns it on for CUDA (fp16 with a GradScaler) and for such CPUs only.

Under CPU bf16 autocast the trained depthwise convolutions are computed in fp32
(`depthwise_in_fp32`): oneDNN's bf16 depthwise backward is slow, 12-23x its fp32 time at stride 2
(forward + backward 13.5 against 0.6 ms for MobileNetV2's 576-channel stride-2 convolution, batch 4
at 256 px, Zen 4; `benchmarks/conv_precision.py`), while its forward is as fast as fp32's or faster
(so frozen ones, run without gradient, stay bf16) and the dense convolutions, most of the
arithmetic, are faster in bf16 (77 against 104 ms summed over the recipe's; docs/learning.md).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .fold_bn import FoldedConv2d


def cpu_has_native_bf16() -> bool:
    """True when this CPU has AVX512-BF16 or AMX tiles (the bf16 kernels oneDNN runs natively)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume not
        return False


def use_amp(amp: bool | str, device: torch.device) -> bool:
    """The run's `amp` option resolved on `device`: 'auto' = CUDA, or a CPU with native bf16."""
    if amp != "auto":
        return bool(amp)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def describe(amp: bool | str, enabled: bool, device: torch.device) -> str:
    """One log line: what `amp` became and why."""
    kind = "fp16" if device.type == "cuda" else "bf16"
    if amp == "auto":
        why = ("CUDA" if device.type == "cuda" else
               "this CPU computes bf16 natively" if enabled else "this CPU has no AVX512-BF16 or AMX")
        return f"amp: auto -> {kind if enabled else 'fp32'} ({why})"
    return f"amp: {kind}" if enabled else "amp: off (fp32)"


class Fp32Conv:
    """Computes its convolution in fp32 whatever autocast says (a mixin before a Conv2d class)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super()._conv_forward(x.float(), weight.float(),  # type: ignore[misc]
                                         None if bias is None else bias.float())


class Fp32Conv2d(Fp32Conv, nn.Conv2d):
    pass


class Fp32FoldedConv2d(Fp32Conv, FoldedConv2d):
    pass


_FP32 = {nn.Conv2d: Fp32Conv2d, FoldedConv2d: Fp32FoldedConv2d}


def depthwise_in_fp32(model: nn.Module) -> int:
    """Compute every trained depthwise Conv2d of `model` (groups == in_channels > 1, weight with
    gradient) in fp32 under autocast. Only the class changes (parameters, state_dict keys and
    exports as they were); returns how many. Apply after freezing and after
    `fold_frozen_batchnorms` (a folded convolution keeps its fold)."""
    n = 0
    for m in model.modules():
        if (type(m) in _FP32 and m.groups > 1 and m.groups == m.in_channels
                and m.weight.requires_grad):
            m.__class__ = _FP32[type(m)]
            n += 1
    return n


def restore_depthwise(model: nn.Module) -> None:
    """Undo `depthwise_in_fp32`."""
    back = {v: k for k, v in _FP32.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
