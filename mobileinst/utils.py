"""Small file helpers shared by the CLI jobs."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
