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

    A part's FLOPs are the counter's growth while the part or one of its direct children runs
    (forward hooks, outermost call only): forward_raw calls the instance decoder's methods, not
    the decoder itself, so the counter's own per-module names would give it nothing. What runs
    outside every part (kernel . features, upsampling, the pooled class term) is `mask_head`.
    Runs with autograd on: torch's module tracker fails under no_grad when a parameter is
    expanded (the learnable queries)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, *imgsz)
    flops = dict.fromkeys(PARTS, 0)
    with FlopCounterMode(display=False) as counter:
        handles = [h for p in PARTS for h in _count_part(getattr(model, p), p, flops, counter)]
        try:
            model.forward_raw(x)
        finally:
            for h in handles:
                h.remove()
    model.train(was_training)
    flops["total"] = counter.get_total_flops()
    flops["mask_head"] = flops["total"] - sum(flops[p] for p in PARTS)
    return flops


def _count_part(part: nn.Module, name: str, flops: dict[str, int], counter: FlopCounterMode) -> list:
    """Hooks adding to flops[name] what the counter counts while `part` or a direct child runs."""
    state = {"depth": 0, "start": 0}

    def enter(*_):
        if state["depth"] == 0:
            state["start"] = counter.get_total_flops()
        state["depth"] += 1

    def leave(*_):
        state["depth"] -= 1
        if state["depth"] == 0:
            flops[name] += counter.get_total_flops() - state["start"]

    return [h for m in (part, *part.children())
            for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]


def summarize(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> ModelSummary:
    """Parameters and FLOPs of a MobileInst network, in total and per part."""
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    params = {p: count_params(getattr(model, p)) for p in PARTS}
    params["total"] = count_params(model)
    return ModelSummary(model.cfg.name, hw, params, count_flops(model, hw))
