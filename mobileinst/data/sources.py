"""Image sources of prediction and calibration: a file, a folder of images or a glob."""
from __future__ import annotations

import glob
from pathlib import Path

from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_sources(source: str | Path) -> list[Path]:
    """An image file, a folder of images (sorted), or a glob pattern -> image paths.

    An existing file is that file even when its name holds glob characters (`photo[1].jpg`); a
    file reached twice (links, a symlink loop under a `**` glob) is listed once, first path kept."""
    s = str(source)
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [p]
    elif any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True)
                       if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise DataError(f"{s}: no such file, folder or glob match")
    if not files:
        raise DataError(f"{s}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return unique_files(files)


def unique_files(files: list[Path]) -> list[Path]:
    """`files` without a second path to the same file (resolved through links), order kept."""
    seen: set[Path] = set()
    unique = []
    for f in files:
        try:
            real = f.resolve(strict=False)
        except (OSError, RuntimeError):  # a link loop of its own: keep it, reading it will fail
            real = f
        if real not in seen:
            seen.add(real)
            unique.append(f)
    return unique
