"""Small file helpers shared by the CLI jobs."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import MobileInstError


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename): an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the OS.

    By default every activation buffer above 128 KiB is mmap-ed and unmapped again, so each eager
    forward/backward page-faults its memory back in (/shared/spec/performance.md, "the allocator
    trap"); measured here, one CPU training step of the demo takes 1.2x-1.4x longer that way.
    This is the in-process form of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>. The peak
    memory is unchanged; memory freed after the peak is kept by the process. Returns whether it
    applied (False off glibc, e.g. macOS or musl)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(name: str | None) -> "torch.device":
    """--device as every verb reads it: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.
    An unknown name or a device this machine lacks is a MobileInstError, before any work."""
    import torch
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise MobileInstError(f"--device {name!r}: unknown device; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this PyTorch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise MobileInstError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise MobileInstError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """`path` can be written as a file: not a folder, its folder creatable and writable.
    MobileInstError before any work otherwise; nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise MobileInstError(f"{path}: the {what} is an existing folder")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise MobileInstError(f"{path}: the {what} cannot be created ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MobileInstError(f"{path}: the {what} is not writable")
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """`path` is, or can be made, a writable folder; MobileInstError before any work otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MobileInstError(f"{path}: the {what} is an existing file, not a folder")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise MobileInstError(f"{path}: the {what} cannot be created ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MobileInstError(f"{path}: the {what} is not writable ({parent} is read-only)")
    return path


def check_range(option: str, value: float | int | None, low: float, high: float) -> None:
    """A numeric option in [low, high] (None = not given); MobileInstError naming it otherwise.
    NaN fails too."""
    import math
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise MobileInstError(f"{option} must be in [{low}, {high}], got {value!r}")


# Inference short side: the network needs 32 px (stride 32); above 4096 px the activations of one
# image outgrow the machines this targets (a 10000 px run failed after a minute).
IMGSZ_RANGE = (32, 4096)
