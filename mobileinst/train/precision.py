"""Which precision a training run uses: `amp` true, false or 'auto'.

bf16 autocast speeds a CPU step only where the CPU computes bf16 natively: on this recipe's
model (MobileNetV2, stride-4 masks, 2 threads) an AMD EPYC Zen 4 with AVX512-BF16 ran a step
1.2x faster (docs/learning.md); without AVX512-BF16 or AMX, oneDNN emulates bf16 and the step
gets slower. So 'auto' turns it on for CUDA (fp16 with a GradScaler) and for such CPUs only.
"""
from __future__ import annotations

import torch


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
