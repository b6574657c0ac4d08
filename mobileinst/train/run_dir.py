"""Run folders a training owns: claimed atomically, locked against a second writer, never reused
by accident.

    runs/train/exp, exp2, ...   a fresh run claims the first free name with an atomic mkdir
    --out-dir DIR               refused if DIR holds a run, unless --resume (continue it) or
                                --exist-ok (its old files are removed, after the lock is held)
    DIR/.lock                   flock()ed by the writing process; the kernel drops it when that
                                process dies, so a killed run never leaves a stale lock
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import yaml

from ..errors import MobileInstError
from ..utils import check_output_dir, close_lock, try_flock

LOCK_NAME = ".lock"
# What a run writes (engine.py's module docstring); "holds a run" means any of these exists.
RUN_FILES = ("config.yaml", "train.log", "results.csv", "loss.png", "ap.png", "weights")


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def claim_new_run_dir(root: str | Path = "runs/train") -> Path:
    """Create and return runs/train/exp, exp2, ... (the first name no one holds). mkdir is atomic,
    so two runs started together get different folders."""
    root = check_output_dir(root, "runs folder")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 100000):
        d = root / ("exp" if i == 1 else f"exp{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise MobileInstError(f"{root}: too many runs")


class RunLock:
    """An exclusive, non-blocking flock on DIR/.lock for as long as the run writes to DIR."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not try_flock(self.fd):  # forked data-loader workers do not hold it (utils.try_flock)
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise MobileInstError(f"{run_dir}: another training is writing to this run folder "
                                  f"(pid {holder}); wait for it or choose another --out-dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self.fd is not None:
            close_lock(self.fd)
            self.fd = None


def is_run(path: Path) -> bool:
    """A folder a mobileinst training wrote: its config.yaml is the mapping engine._setup_outputs
    writes (train and model options)."""
    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and {"train", "model"} <= cfg.keys()


def clear_run(run_dir: Path) -> None:
    """Remove an old run's files (--exist-ok): only the names a run writes, so anything else there
    stays; a folder that is not a mobileinst run is refused, its files untouched."""
    if not is_run(run_dir):
        raise MobileInstError(f"{run_dir}: holds files that are not a mobileinst run's (no run "
                              "config.yaml); --exist-ok replaces only a run: choose another --out-dir")
    for name in RUN_FILES:
        if name != "weights":
            (run_dir / name).unlink(missing_ok=True)
    weights = run_dir / "weights"
    for name in ("last.pt", "best.pt"):
        (weights / name).unlink(missing_ok=True)
    remove_stale_temporaries(weights)
    with contextlib.suppress(OSError):
        weights.rmdir()  # only when empty: a file of the user's there stays
    for p in run_dir.glob("events.out.tfevents.*"):
        p.unlink()


def remove_stale_temporaries(weights_dir: Path) -> list[Path]:
    """Delete `.last.pt.*.tmp` files a killed save left behind (save_checkpoint's temporaries).
    Only the lock holder calls this, so no live save is touched."""
    stale = sorted(weights_dir.glob(".*.pt.*.tmp")) if weights_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
