"""Learning-rate schedule: linear warm-up, then a decay over the run's progress.

The lr factor is a function of the iteration (for the warm-up) and of the run's progress p in
[0, 1]: iterations done / total for a run of --iters/--epochs, seconds spent / budget for a run
of --time (`Trainer`), so a wall-clock budget gets the whole schedule whatever the machine's speed.

- `step`: the SparseInst/MobileInst recipe (hustvl/SparseInst `configs/Base-SparseInst.yaml`:
  270k iterations, steps at 210k and 250k): lr x 0.1 at 210/270 and
  250/270 of the run (detectron2's WarmupMultiStepLR, with the milestones as fractions).
- `linear`: linear decay to zero at the end of the run, which beats step schedules at small
  budgets (Li, Yumer, Ramanan, "Budgeted Training", ICLR 2020).
The warm-up is linear from a factor 1e-3 over `warmup_iters`, and ends by a quarter of the run.
"""
from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

STEP_FRACTIONS = (210 / 270, 250 / 270)
SCHEDULES = ("step", "linear")


def lr_factor(kind: str, iteration: int, progress: float, warmup_iters: int,
              warmup_factor: float = 1e-3, gamma: float = 0.1) -> float:
    """The lr multiplier at `iteration`, with the run `progress` (0..1) done."""
    if kind == "step":
        decay = gamma ** sum(progress >= f for f in STEP_FRACTIONS)
    elif kind == "linear":
        decay = max(0.0, 1.0 - progress)
    else:
        raise ValueError(f"unknown lr schedule {kind!r}: expected one of {SCHEDULES}")
    # warm-up: over warmup_iters, but done by a quarter of the run
    alpha = 1.0 if warmup_iters <= 0 else min(1.0, max(iteration / warmup_iters, 4 * progress))
    return decay * (warmup_factor * (1 - alpha) + alpha)


class LrSchedule:
    """Sets every param group's lr to its base lr x `lr_factor` before each step (`set`)."""

    def __init__(self, optimizer: Optimizer, kind: str = "step", warmup_iters: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}: expected one of {SCHEDULES}")
        self.optimizer, self.kind, self.warmup_iters = optimizer, kind, warmup_iters
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.set(0, 0.0)

    def set(self, iteration: int, progress: float) -> float:
        """Apply the factor for this iteration and progress; returns it."""
        f = lr_factor(self.kind, iteration, min(max(progress, 0.0), 1.0), self.warmup_iters)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
        return f

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints of torch's LambdaLR (format 1 runs) also hold base_lrs
        self.base_lrs = list(state["base_lrs"])
