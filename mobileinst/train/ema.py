"""Exponential moving average of the model weights (optional in training)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """ema = d * ema + (1 - d) * model, with d = decay * (1 - exp(-updates / ramp)) ramped up over
    the first updates (as YOLO does, tau 2000), so early weights are not dominated by the random
    initialisation; a short run wants a short ramp (RF-DETR: decay 0.993, tau 100). Buffers are
    copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, ramp: int = 2000) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        ema_state = self.module.state_dict()
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema_state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                ema_state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
