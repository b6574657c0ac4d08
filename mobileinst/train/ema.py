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
        self._pairs: tuple[list, list, list, list] | None = None  # (ema, model) floats, others

    def _tensor_pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """The two state_dicts' tensors, split into floating point (averaged) and the rest
        (copied); views that share storage with the live weights, so they are taken once."""
        if self._pairs is None:
            ema_state, state = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in state.items() if v.dtype.is_floating_point]
            others = [k for k in state if not state[k].dtype.is_floating_point]
            self._pairs = ([ema_state[k] for k in floats], [state[k] for k in floats],
                           [ema_state[k] for k in others], [state[k] for k in others])
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        ema_f, model_f, ema_o, model_o = self._tensor_pairs(model)
        torch._foreach_lerp_(ema_f, model_f, 1 - d)  # ema += (1 - d) * (model - ema), one kernel
        for e, v in zip(ema_o, model_o):
            e.copy_(v)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
