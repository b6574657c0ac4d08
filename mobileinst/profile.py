"""Model size and cost: parameters and FLOPs in total and per part.

FLOPs come from PyTorch's own counter (torch.utils.flop_counter), which counts 2 FLOPs per
multiply-accumulate of convolutions, matmuls and attention; element-wise ops, pooling and
interpolation are not counted (as in every common FLOP counter). GMACs = GFLOPs / 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PARTS = ("backbone", "mask_decoder", "instance_decoder")


@dataclass
class ModelSummary:
    name: str
    imgsz: tuple[int, int]
    params: dict[str, int]  # part -> parameter count, plus "total"
    flops: dict[str, int]  # part -> FLOPs, plus "mask_head" (kernel . features, upsampling) and "total"

    def rows(self) -> list[tuple[str, float, float]]:
        """(part, params in M, GFLOPs) rows, total last."""
        parts = [*PARTS, "mask_head", "total"]
        return [(p, self.params.get(p, 0) / 1e6, self.flops.get(p, 0) / 1e9) for p in parts]

    def format(self) -> str:
        lines = [f"{self.name} @ {self.imgsz[0]}x{self.imgsz[1]}",
                 f"{'part':<18}{'params (M)':>12}{'GFLOPs':>10}"]
        lines += [f"{p:<18}{mp:>12.3f}{gf:>10.3f}" for p, mp, gf in self.rows()]
        return "\n".join(lines)


def count_params(module: nn.Module) -> int:
    """Trainable-or-not parameters (BN affine included, running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(model: nn.Module, imgsz: tuple[int, int]) -> dict[str, int]:
    """FLOPs of model.forward_raw on one (1, 3, H, W) image, per top-level part.

    Runs with autograd on: torch's module tracker fails under no_grad when a parameter is
    expanded (the learnable queries)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, *imgsz)
    with FlopCounterMode(display=False) as counter:
        model.forward_raw(x)
    model.train(was_training)
    # forward_raw calls the parts directly, so the tracker names each part by its class
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    flops = {p: counts.get(type(getattr(model, p)).__name__, 0) for p in PARTS}
    flops["total"] = counts.get("Global", 0)
    flops["mask_head"] = flops["total"] - sum(flops[p] for p in PARTS)
    return flops


def summarize(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> ModelSummary:
    """Parameters and FLOPs of a MobileInst network, in total and per part."""
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    params = {p: count_params(getattr(model, p)) for p in PARTS}
    params["total"] = count_params(model)
    return ModelSummary(model.cfg.name, hw, params, count_flops(model, hw))
