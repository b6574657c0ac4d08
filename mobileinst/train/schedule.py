"""Learning-rate schedule: linear warm-up then step decay (detectron2's WarmupMultiStepLR).

SparseInst/MobileInst recipe (/shared/spec/training.md §4): 1000 warm-up iterations from a factor
1e-3, lr x 0.1 at 210k and 250k of 270k iterations; we keep those fractions of the run length.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

STEP_FRACTIONS = (210 / 270, 250 / 270)


def warmup_multistep(total_iters: int, warmup_iters: int, warmup_factor: float = 1e-3,
                     steps: tuple[float, ...] = STEP_FRACTIONS, gamma: float = 0.1):
    """lr factor as a function of the iteration: linear warm-up, then x gamma at each step."""
    milestones = [int(f * total_iters) for f in steps]

    def factor(it: int) -> float:
        decay = gamma ** sum(it >= m for m in milestones)
        if it < warmup_iters:
            alpha = it / warmup_iters
            return decay * (warmup_factor * (1 - alpha) + alpha)
        return decay

    return factor


def build_scheduler(optimizer: Optimizer, total_iters: int, warmup_iters: int) -> LambdaLR:
    return LambdaLR(optimizer, warmup_multistep(total_iters, warmup_iters))
