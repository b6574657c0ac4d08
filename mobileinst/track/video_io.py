"""Reading frames from a video file, a folder of frames or a glob, and writing an mp4 (OpenCV).

    with open_frames("clip.mp4") as frames:          # or "frames/", or "frames/*.jpg"
        for index, rgb in frames: ...
    with Mp4Writer("out.mp4", fps=frames.fps) as w:  # opened on the first frame, released on exit
        w.write(rgb)

Problems name the path: a video that cannot be opened or yields no frame, a folder without images,
an mp4 that could not be written (a full disk: one line with the OS's reason, an earlier file kept).
"""
from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..errors import DataError, MobileInstError
from ..data.coco import read_rgb as read_image
from ..data.sources import IMAGE_SUFFIXES, list_sources
from ..utils import os_reason, probe_write, temp_file_beside, write_error

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
    resized to it. Always release it (`close` or a with-block) so the file is finalised.

    The frames go to a temporary file beside `path` (`.NAME.*.tmp.mp4`), which `close` checks
    (`mp4_complete`) and renames over `path`: OpenCV's writer fails silently on a full disk
    (it only logs "Failed to write frame"), so a file cut short is found there and reported as
    one line naming `path` and the OS's reason (`utils.probe_write`: "No space left on device
    (ENOSPC)"); an earlier file at `path` is then kept and the temporary removed."""

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS) -> None:
        self.path, self.fps = Path(path), fps
        self.writer: cv2.VideoWriter | None = None
        self.tmp: str | None = None  # the file being written
        self.size: tuple[int, int] | None = None  # (w, h)
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self._open((rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2))  # even sides for codecs
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
        with quiet_opencv():  # its per-frame warnings on a full disk: reported once, by close
            self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def _open(self, size: tuple[int, int]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = temp_file_beside(self.path, suffix=".tmp" + self.path.suffix)
            os.close(fd)
        except OSError as e:
            raise write_error(self.path, e) from None
        self.size = size
        with quiet_opencv():
            self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, size)
        if not self.writer.isOpened():
            self.writer = None
            self._fail("OpenCV cannot write an mp4 here")

    def close(self) -> None:
        """Release the writer and put the finished file at `path`; MobileInstError naming it when
        the file could not be written whole (the previous file at `path` is left as it was)."""
        if self.writer is None:
            return
        with quiet_opencv():
            self.writer.release()
        self.writer = None
        if not mp4_complete(self.tmp):
            self._fail("the mp4 writer (OpenCV) stopped before the end of the file")
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._discard()
            raise write_error(self.path, e) from None
        self.tmp = None

    def _fail(self, fallback: str) -> None:
        """Raise the one-line error for `path`: the OS's reason when a probe write fails too,
        else `fallback`; the temporary file is removed after the probe."""
        why = probe_write(self.path.parent)
        self._discard()
        raise MobileInstError(f"{self.path}: could not be written: "
                              f"{os_reason(why) if why else fallback}")

    def _discard(self) -> None:
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)
            self.tmp = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """OpenCV's own log at errors only inside the block (its level is put back after)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def mp4_complete(path: str | Path) -> bool:
    """The file is a whole ISO base media (mp4) file: its top-level boxes (32-bit size, type;
    size 1: a 64-bit size follows; 0: to the end) tile it exactly, and one of them is the
    'moov' index, which FFmpeg's muxer writes last (ISO/IEC 14496-12, 4.2). A write cut short
    leaves a box running past the end of the file, or no moov."""
    try:
        end = os.path.getsize(path)
        with open(path, "rb") as f:
            pos, kinds = 0, set()
            while pos < end:
                f.seek(pos)
                head = f.read(16)
                if len(head) < 8:
                    return False
                n, kind = struct.unpack(">I4s", head[:8])
                if n == 1:
                    n = struct.unpack(">Q", head[8:16])[0] if len(head) == 16 else 0
                elif n == 0:
                    n = end - pos
                if n < 8 or pos + n > end:
                    return False
                kinds.add(kind)
                pos += n
    except OSError:
        return False
    return b"moov" in kinds
