"""Drawing: instance overlays for images and videos, and training curves."""
from __future__ import annotations

import colorsys
import csv
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from .utils import atomic_path, write_image


def color(i: int) -> tuple[int, int, int]:
    """A distinct RGB colour for instance / track i (golden-ratio hue steps)."""
    h = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: np.ndarray, masks: Iterable[np.ndarray], labels: list[str],
                   colors: list[tuple[int, int, int]], alpha: float = 0.5) -> np.ndarray:
    """Overlay masks (K, H, W) bool on an RGB uint8 image, with contours and a caption per instance.

    Each instance is blended (in bands of rows), outlined and located inside its own bounding box,
    in uint8: besides the output image nothing of the image's size is allocated (no float copy,
    no per-instance full-size arrays); the largest temporary is one mask's box as uint8 0/1 for
    its outline (1/3 of the image's bytes at most). `masks` is read once, in order, each mask
    only while it is blended and outlined: any iterable of (H, W) masks does (a `MaskChunks`,
    made a few at a time: memory bounded however many instances a huge photo has). The outlines
    and captions are drawn over all the blends, as before."""
    out = image.copy()  # (H, W, 3) uint8
    outlines = []  # (contours, caption, color, box) of each non-empty mask
    for m, text, c in zip(masks, labels, colors):
        box = mask_box(m)
        if box is None:
            continue
        _blend(out, m, c, alpha, box)
        y0, y1, x0, x1 = box
        crop = np.ascontiguousarray(m[y0:y1, x0:x1]).view(np.uint8)  # (h, w) 0/1, the box only
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                       offset=(x0, y0))
        outlines.append((contours, text, c, box))
    for contours, text, c, (y0, _, x0, _) in outlines:
        cv2.drawContours(out, contours, -1, c, 1, cv2.LINE_AA)
        _caption(out, text, (x0, y0), c)
    return out


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end exclusive, of a (H, W) bool mask's pixels; None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))  # (H,), (W,)
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


BLEND_ROWS = 256  # rows of a box blended at once: temporaries of 256 x W x 3 bytes


def _blend(out: np.ndarray, mask: np.ndarray, c: tuple[int, int, int], alpha: float,
           box: tuple[int, int, int, int]) -> None:
    """out = out * (1 - alpha) + c * alpha on the mask's pixels, in place, within its box, in
    bands of BLEND_ROWS rows (uint8, rounded)."""
    y0, y1, x0, x1 = box
    solid = np.empty((min(BLEND_ROWS, y1 - y0), x1 - x0, 3), np.uint8)  # (rows, w, 3)
    solid[:] = np.asarray(c, np.uint8)
    for y in range(y0, y1, BLEND_ROWS):
        region = out[y:min(y + BLEND_ROWS, y1), x0:x1]  # (rows, w, 3) a view
        mixed = cv2.addWeighted(region, 1 - alpha, solid[: len(region)], alpha, 0.0)
        np.copyto(region, mixed, where=mask[y:y + len(region), x0:x1, None])


def _caption(img: np.ndarray, text: str, xy: tuple[int, int], c: tuple[int, int, int]) -> None:
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (w, h), base = cv2.getTextSize(text, font, scale, 1)
    x, y = xy[0], max(xy[1], h + base)
    cv2.rectangle(img, (x, y - h - base), (x + w, y), c, -1)
    cv2.putText(img, text, (x, y - base), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def save_rgb(path: str | Path, image: np.ndarray) -> None:
    """An RGB image written atomically (`utils.write_image`: a failed write names the file)."""
    write_image(path, image)


def plot_curves(results_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (every loss column over iterations) and ap.png (mask AP / AP50 over iterations)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    it = [float(r["iteration"]) for r in rows]
    written = []
    for fname, keys, title in (("loss.png", [k for k in rows[0] if k.startswith("loss")], "losses"),
                               ("ap.png", ["AP", "AP50", "AP75"], "val mask AP")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            pts = [(x, float(r[k])) for x, r in zip(it, rows) if r.get(k) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with atomic_path(Path(out_dir) / fname) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)
        written.append(Path(out_dir) / fname)
    return written
