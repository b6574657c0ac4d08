"""Reading frames from a video file, a folder of frames or a glob, and writing an mp4 (OpenCV).

    with open_frames("clip.mp4") as frames:          # or "frames/", or "frames/*.jpg"
        for index, rgb in frames: ...
    with Mp4Writer("out.mp4", fps=frames.fps) as w:  # opened on the first frame, released on exit
        w.write(rgb)

Problems name the path: a video that cannot be opened or yields no frame, a folder without images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..errors import DataError
from ..data.coco import read_rgb as read_image
from ..data.sources import IMAGE_SUFFIXES, list_sources

DEFAULT_FPS = 10.0  # frame folders carry no frame rate


class FrameSource:
    """Iterates (index, RGB uint8 (H, W, 3)) over a video file or an ordered list of image files.

    `length` is the number of frames when known (frame folders; video containers that report it),
    else None; `fps` the container's frame rate or DEFAULT_FPS; `name` a stem for output files."""

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        p = Path(self.source)
        self.cap: cv2.VideoCapture | None = None
        self.files: list[Path] = []
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
            self._open_video(p)
            self.name = p.stem
        else:
            self.files = list_sources(self.source)  # DataError naming the source when empty
            self.length, self.fps = len(self.files), DEFAULT_FPS
            self.name = p.name if p.is_dir() else (p.stem if p.is_file() else "frames")

    def _open_video(self, p: Path) -> None:
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            cap.release()
            raise DataError(f"{p}: cannot open the video (not a video file, or a codec OpenCV lacks)")
        self.cap = cap
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.length = n if n > 0 else None
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else DEFAULT_FPS

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.cap is None:
            for i, f in enumerate(self.files):
                yield i, read_image(f)
            return
        i = 0
        while True:
            ok, bgr = self.cap.read()
            if not ok:
                break
            yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            i += 1
        if i == 0:
            raise DataError(f"{self.source}: the video opened but no frame could be decoded")
        self.length = i  # the container's count can be off; the decoded count is the truth

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_frames(source: str | Path) -> FrameSource:
    """A video file, a folder of frames (sorted by name) or a glob pattern -> FrameSource."""
    return FrameSource(source)


class Mp4Writer:
    """An mp4 (mp4v) writer opened lazily on the first frame; later frames of another size are
    resized to it. Always release it (`close` or a with-block) so the file is finalised."""

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS) -> None:
        self.path, self.fps = Path(path), fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (w, h)
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.size = (rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2)  # even sides for codecs
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                          self.size)
            if not self.writer.isOpened():
                raise DataError(f"{self.path}: OpenCV cannot write an mp4 here")
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
