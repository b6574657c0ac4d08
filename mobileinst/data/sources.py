"""Image sources of prediction and calibration: a file, a folder of images or a glob."""
from __future__ import annotations

import glob
from pathlib import Path

from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_sources(source: str | Path) -> list[Path]:
    """An image file, a folder of images (sorted), or a glob pattern -> image paths."""
    s = str(source)
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    elif any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True)
                       if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{s}: no such file, folder or glob match")
    if not files:
        raise DataError(f"{s}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files
