"""Where the official backbones' golden outputs are (`shared/golden`, see its README; 110 MB, not in
the repository): $MOBILEINST_GOLDEN, else `shared/golden` inside or beside the checkout, else the
workspace's /work/shared/golden or /shared/golden. Tests that need one skip, naming the places
looked in, when none has it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIRS = [Path(p) for p in [os.environ.get("MOBILEINST_GOLDEN", "")] if p] + [
    _ROOT / "shared" / "golden", _ROOT.parent / "shared" / "golden",
    Path("/work/shared/golden"), Path("/shared/golden")]


def find_golden(name: str) -> Path | None:
    """The first `<dir>/<name>.pt` of GOLDEN_DIRS that exists, else None."""
    return next((d / f"{name}.pt" for d in GOLDEN_DIRS if (d / f"{name}.pt").is_file()), None)


def golden_path(name: str) -> Path:
    """`find_golden(name)`, or skip the test saying where it looked."""
    path = find_golden(name)
    if path is None:
        pytest.skip(f"golden file {name}.pt not found in: {', '.join(map(str, GOLDEN_DIRS))}")
    return path
