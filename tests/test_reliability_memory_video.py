"""Issue 23, what was left: `val` on a huge photo keeps its memory bounded (its full-size masks are
made a few at a time, `infer.results.MaskChunks`), and the tracker's mp4 on a full disk is one
line naming the file, an earlier mp4 intact and no temporary left (`track.video_io.Mp4Writer`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from mobileinst.checkpoint import save_checkpoint
from mobileinst.data.synthetic import CLASSES

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path: Path, num_queries: int = 100, imgsz: int = 64) -> Path:
    """An untrained 4-class TopFormer-T checkpoint (the synthetic set's classes)."""
    from mobileinst.models.factory import build_model
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=len(CLASSES), num_queries=num_queries)
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "ema": None,
                     "class_names": list(CLASSES), "cat_ids": list(range(1, len(CLASSES) + 1)),
                     "train_config": {"imgsz": imgsz}}, path)
    return path


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with a few filled shapes (uint8, built row band by row band)."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    ramp = np.linspace(30, 220, w, dtype=np.float32)[None, :, None]
    for y in range(0, h, 512):
        img[y:y + 512] = ramp.astype(np.uint8)
    for _ in range(6):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.ellipse(img, (cx, cy), (w // 8, h // 10), 0, 0, 360, c, -1)
    return img


def one_image_val_set(root: Path, h: int, w: int) -> Path:
    """root/data.yaml: one h x w val image with one square instance (train = val)."""
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "big.jpg"), photo(h, w))
    s = min(h, w) // 4
    gt = {"images": [{"id": 1, "file_name": "big.jpg", "height": h, "width": w}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": s * s,
                           "bbox": [s, s, s, s], "segmentation": [[s, s, 2 * s, s, 2 * s, 2 * s, s, 2 * s]]}],
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    (root / "val.json").write_text(json.dumps(gt))
    split = {"json": str(root / "val.json"), "images": str(root / "images")}
    (root / "data.yaml").write_text(json.dumps({"train": split, "val": split, "names": list(CLASSES)}))
    return root / "data.yaml"


# -- val: the full-size masks made a few at a time -------------------------------------------------
def records_of(result, image_id: int = 1) -> list[dict[str, Any]]:
    from mobileinst.infer.results import result_records
    return result_records(result, image_id, "x.jpg", list(range(1, len(CLASSES) + 1)))


def test_lazy_masks_are_the_masks_made_at_once(tmp_path):
    from mobileinst.infer.predictor import TorchPredictor
    predictor = TorchPredictor.from_checkpoint(tiny_checkpoint(tmp_path / "w.pt"), conf=None)
    image = photo(300, 450)
    eager, lazy = predictor(image), predictor(image, lazy_masks=True)
    assert isinstance(eager.masks, np.ndarray) and lazy.masks.shape == eager.masks.shape
    assert len(eager) > 10  # random weights keep many instances: several chunks below
    lazy.masks.step = 3  # a few masks per call, as on a huge photo
    assert records_of(lazy) == records_of(eager)


def test_lazy_masks_of_a_post_processed_graph_are_the_same_masks():
    from mobileinst.infer.results import postprocessed_result
    from mobileinst.models.model_info import ModelInfo
    info = ModelInfo("m", len(CLASSES), tuple(CLASSES), tuple(range(1, len(CLASSES) + 1)))
    rng = np.random.default_rng(0)
    out = {"labels": rng.integers(0, 4, (1, 7)), "scores": rng.uniform(0, 1, (1, 7)).astype(np.float32),
           "masks": (rng.uniform(0, 1, (1, 7, 40, 56)) > 0.6).astype(np.uint8)}
    eager = postprocessed_result(out, 0, (37, 50), (370, 500), 0.2, info)
    lazy = postprocessed_result(out, 0, (37, 50), (370, 500), 0.2, info, lazy_masks=True)
    lazy.masks.step = 2
    assert len(lazy) == len(eager) > 2 and not isinstance(lazy.masks, np.ndarray)
    assert records_of(lazy) == records_of(eager)
    assert np.array_equal(np.stack(list(lazy.masks)), eager.masks)


PEAK_CHILD = """
import sys
from pathlib import Path
from mobileinst.cli import main
code = main(sys.argv[1:])
hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')]
print('PEAK', code, int(hwm[0].split()[1]) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_val_of_one_6000x6000_photo_keeps_its_memory_bounded(tmp_path):
    """100 instances of a 6000 x 6000 photo were 3.6 GB of masks at once (val peaked at 4.5 GB);
    made a few at a time they never hold more than ~64 MiB of masks. The peak is the child's own
    VmHWM (its fresh address space: the test process's memory does not count)."""
    data = one_image_val_set(tmp_path / "set", 6000, 6000)
    weights = tiny_checkpoint(tmp_path / "w.pt")
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-c", PEAK_CHILD, "val", "--weights", str(weights), "--data", str(data),
           "--imgsz", "64", "--workers", "0", "--threads", "1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")]
    assert p.returncode == 0 and line, p.stderr[-2000:]
    _, code, peak = line[0].split()
    records = json.loads(out.read_text())
    assert code == "0" and len(records) >= 50  # at once: >= 50 x 36 MB = 1.8 GB of masks alone
    assert int(peak) < 1.5 * 2**30, f"val peaked at {int(peak) / 2**20:.0f} MiB"


# -- track: the mp4 on a full disk -----------------------------------------------------------------
@pytest.fixture(scope="module")
def noise_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of 6 noise frames, 160 x 120: an mp4 of ~100 KB; a tiny 10-query checkpoint)."""
    root = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    (root / "frames").mkdir()
    for i in range(6):
        cv2.imwrite(str(root / "frames" / f"{i:03d}.png"), rng.integers(0, 255, (120, 160, 3), np.uint8))
    return root / "frames", tiny_checkpoint(root / "w.pt", num_queries=10)


def error_lines(err: str) -> list[str]:
    """stderr without tqdm's progress bar ("track: ...%|...|", redrawn after each \\r)."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("track:")]


class SilentWriter:
    """cv2.VideoWriter on a full disk: it opens, takes every frame and releases without an error,
    having written nothing (OpenCV only logs "Failed to write frame")."""

    def __init__(self, *args) -> None:
        pass

    def isOpened(self) -> bool:
        return True

    def write(self, frame: np.ndarray) -> None:
        pass

    def release(self) -> None:
        pass


def test_track_on_a_full_disk_is_one_line_and_keeps_the_earlier_files(noise_clip, tmp_path, capsys,
                                                                        monkeypatch, request):
    from mobileinst.cli import main
    frames, weights = noise_clip
    out = tmp_path / "o"
    out.mkdir()
    for name in ("frames.mp4", "results.json", "summary.json"):
        (out / name).write_bytes(b"an earlier run's " + name.encode())
    # an earlier track's files, as it recorded them (another's would be refused, never replaced)
    (out / ".mobileinst-files.json").write_text('["frames.mp4", "results.json", "summary.json"]')
    monkeypatch.setattr(cv2, "VideoWriter", SilentWriter)
    request.getfixturevalue("full_disk")  # the probe write and the json files: ENOSPC
    assert main(["track", "--weights", str(weights), "--source", str(frames), "--out-dir", str(out),
                 "--imgsz", "64"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0] == (f"mobileinst track: error: {out / 'frames.mp4'}: could not be written: No space "
                        f"left on device (ENOSPC); not written either: {out / 'results.json'}, "
                        f"{out / 'summary.json'}")
    for name in ("frames.mp4", "results.json", "summary.json"):
        assert (out / name).read_bytes() == b"an earlier run's " + name.encode()
    assert sorted(p.name for p in out.iterdir()) == [".mobileinst-files.json", "frames.mp4",
                                                     "results.json", "summary.json"]


def test_an_mp4_cut_short_is_never_put_in_place(tmp_path, monkeypatch):
    """A writer that stops half-way (no 'moov' index) with the disk not full: the fallback reason,
    the earlier file kept; a whole mp4 replaces it with the mode a plain write gives."""
    from mobileinst.errors import MobileInstError
    from mobileinst.track.video_io import Mp4Writer, mp4_complete
    path = tmp_path / "v.mp4"
    path.write_bytes(b"earlier")
    path.chmod(0o644)
    with Mp4Writer(path) as w:
        for _ in range(3):
            w.write(np.zeros((48, 64, 3), np.uint8))
    assert mp4_complete(path) and path.stat().st_mode & 0o777 == 0o644
    whole = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[:len(whole) // 2])
    assert not mp4_complete(cut) and not mp4_complete(tmp_path / "missing.mp4")
    real = cv2.VideoWriter

    class HalfWriter(SilentWriter):  # writes the file, then loses its second half
        def __init__(self, name, *args) -> None:
            self.name, self.w = name, real(name, *args)

        def write(self, frame: np.ndarray) -> None:
            self.w.write(frame)

        def release(self) -> None:
            self.w.release()
            data = Path(self.name).read_bytes()
            Path(self.name).write_bytes(data[:len(data) // 2])
    monkeypatch.setattr(cv2, "VideoWriter", HalfWriter)
    w = Mp4Writer(path)
    w.write(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(MobileInstError, match=r"v.mp4: could not be written: the mp4 writer \(OpenCV\) "
                                              r"stopped before the end of the file$"):
        w.close()
    assert path.read_bytes() == whole and sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4", "v.mp4"]


FULL_TMPFS = """
mount -t tmpfs -o size=64k none "$OUT" || exit 77
printf 'an earlier mp4' > "$OUT/frames.mp4"
printf '["frames.mp4"]' > "$OUT/.mobileinst-files.json"  # an earlier track's (utils.claim_files)
"$PY" -m mobileinst.cli track --weights "$W" --source "$SRC" --out-dir "$OUT" --imgsz 64 2> "$LOG/err"
echo $? > "$LOG/rc"
ls -a "$OUT" > "$LOG/ls"
cp "$OUT/frames.mp4" "$LOG/frames.mp4"
"""


@pytest.mark.skipif(sys.platform != "linux", reason="a size-limited tmpfs in a mount namespace")
def test_track_on_a_really_full_disk(noise_clip, tmp_path):
    """The real thing: a 64 KiB tmpfs (mounted in a user + mount namespace, `unshare -rm`; skipped
    where that is not allowed) that the ~100 KB mp4 overflows. OpenCV's own warnings stay quiet."""
    import shutil
    frames, weights = noise_clip
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    out, log = tmp_path / "mnt", tmp_path / "log"
    out.mkdir()
    log.mkdir()
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "LOG": str(log), "PY": sys.executable,
           "W": str(weights), "SRC": str(frames), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_TMPFS], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0 or not (log / "rc").exists():
        pytest.skip(f"cannot mount a tmpfs in a namespace here: {p.stderr.strip()[:200]}")
    lines = error_lines((log / "err").read_text())
    assert (log / "rc").read_text().strip() == "2"
    assert lines == [f"mobileinst track: error: {out / 'frames.mp4'}: could not be written: "
                     "No space left on device (ENOSPC)"], lines
    assert (log / "frames.mp4").read_bytes() == b"an earlier mp4"
    assert (log / "ls").read_text().split() == [".", "..", ".mobileinst-files.json", "frames.mp4",
                                                "results.json", "summary.json"]
