"""Drawing: instance overlays for images and videos, and training curves."""
from __future__ import annotations

import colorsys
import csv
from pathlib import Path

import cv2
import numpy as np


def color(i: int) -> tuple[int, int, int]:
    """A distinct RGB colour for instance / track i (golden-ratio hue steps)."""
    h = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: np.ndarray, masks: np.ndarray, labels: list[str],
                   colors: list[tuple[int, int, int]], alpha: float = 0.5) -> np.ndarray:
    """Overlay masks (K, H, W) bool on an RGB uint8 image, with contours and a caption per instance."""
    out = image.astype(np.float32)
    for m, c in zip(masks, colors):
        out[m] = out[m] * (1 - alpha) + np.asarray(c, np.float32) * alpha
    out = out.clip(0, 255).astype(np.uint8)
    for m, text, c in zip(masks, labels, colors):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, c, 1, cv2.LINE_AA)
        ys, xs = np.nonzero(m)
        if len(xs):
            _caption(out, text, (int(xs.min()), int(ys.min())), c)
    return out


def _caption(img: np.ndarray, text: str, xy: tuple[int, int], c: tuple[int, int, int]) -> None:
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (w, h), base = cv2.getTextSize(text, font, scale, 1)
    x, y = xy[0], max(xy[1], h + base)
    cv2.rectangle(img, (x, y - h - base), (x + w, y), c, -1)
    cv2.putText(img, text, (x, y - base), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def save_rgb(path: str | Path, image: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


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
        fig.savefig(Path(out_dir) / fname, dpi=100)
        plt.close(fig)
        written.append(Path(out_dir) / fname)
    return written
