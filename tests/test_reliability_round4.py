"""Issue 23, fourth round: the in-run evaluation (`predict_dataset`) and `predict` make their
full-size masks a few at a time (`infer.results.MaskChunks`), as `val` does, with the same records
and overlays; `predict --conf 0` on a huge photo keeps its memory bounded; the ncnn export renames
pnnx's files into place from a temporary folder inside the destination (a move from /tmp to
another file system was a copy, which a crash left half done under the final name).

Each case is a row of a table, in the style of tests/test_fuzz.py. All fast but the peak-memory
row, a 4000 x 4000 photo in a child process (its own VmHWM)."""
from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import torch

from mobileinst.cli import main
from mobileinst.data.synthetic import CLASSES
from test_reliability_files import one_line_error
from test_reliability_memory_video import PEAK_CHILD, photo, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CAT_IDS = list(range(1, len(CLASSES) + 1))


# -- the full-size masks: never all of an image (or a batch) at once ---------------------------------
class MaskCalls:
    """`binary_masks` wrapped where every decode calls it (`decode_instances` in
    models/postprocess.py, `lazy_binary_masks` in infer/predictor.py): the (K, H0, W0) of each
    call, each asserted to be at most MASK_CHUNK_BYTES of masks (or a single mask)."""

    def __init__(self, monkeypatch) -> None:
        from mobileinst.infer import predictor, results
        from mobileinst.models import postprocess
        self.results, self.shapes, real = results, [], postprocess.binary_masks

        def binary_masks(mask_prob, padded, size, orig, threshold):
            k, (h0, w0) = len(mask_prob), orig
            self.shapes.append((k, h0, w0))
            assert k <= max(1, self.results.MASK_CHUNK_BYTES // (h0 * w0)), \
                f"{k} full-size masks of {h0} x {w0} made at once"
            return real(mask_prob, padded, size, orig, threshold)
        monkeypatch.setattr(postprocess, "binary_masks", binary_masks)
        monkeypatch.setattr(predictor, "binary_masks", binary_masks)

    def masks(self) -> int:
        return sum(k for k, _, _ in self.shapes)


def tiny_model(num_queries: int = 100) -> torch.nn.Module:
    """An untrained 4-class TopFormer-T (random weights keep ~all of its queries)."""
    from mobileinst.models.factory import build_model
    torch.manual_seed(0)
    return build_model("mobileinst-topformer-t", num_classes=len(CLASSES), num_queries=num_queries).eval()


class BigOriginals(torch.utils.data.Dataset):
    """`n` 64 x 96 images whose originals are `orig` (the in-run evaluation's masks are made at
    the original size, whatever the network saw): what a val set of large photos feeds it."""

    def __init__(self, n: int, orig: tuple[int, int]) -> None:
        self.n, self.orig, self.cat_ids = n, orig, CAT_IDS

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = torch.from_numpy(photo(64, 96, seed=i)).permute(2, 0, 1).contiguous()
        return image, {"image_id": i + 1, "orig_size": self.orig, "size": (64, 96)}


def in_run_evaluation(tmp_path: Path) -> int:
    """Training's evaluation of 2 images with 600 x 900 originals, one batch: ~200 masks of
    0.5 MB, made 3 at a time (MASK_CHUNK_BYTES)."""
    from mobileinst.evaluate.evaluator import predict_dataset
    records = predict_dataset(tiny_model(), BigOriginals(2, (600, 900)), batch_size=2, progress=False)
    return len(records)


def predict_conf_0(tmp_path: Path) -> int:
    """`predict --conf 0` of a 600 x 900 photo (records and overlay: one pass)."""
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "big.jpg"), photo(600, 900))
    assert main(["predict", "--weights", str(tiny_checkpoint(tmp_path / "w.pt")), "--source",
                 str(tmp_path / "img"), "--out-dir", str(tmp_path / "out"), "--conf", "0",
                 "--imgsz", "64", "--device", "cpu"]) == 0
    return len(json.loads((tmp_path / "out" / "predictions.json").read_text()))


# (case, what runs it -> the records it made)
BOUNDED = [
    ("in-run evaluation", in_run_evaluation),
    ("predict --conf 0", predict_conf_0),
]


@pytest.mark.parametrize("case,run", BOUNDED, ids=[c[0] for c in BOUNDED])
def test_full_size_masks_are_made_a_few_at_a_time(tmp_path, monkeypatch, case, run: Callable):
    """Each call of `binary_masks` makes at most MASK_CHUNK_BYTES of masks (here 3 masks of
    600 x 900); before, an image's ~100 kept masks were one call (1.6 GB at 4000 x 4000)."""
    from mobileinst.infer import results
    monkeypatch.setattr(results, "MASK_CHUNK_BYTES", 3 * 600 * 900)
    calls = MaskCalls(monkeypatch)
    n = run(tmp_path)
    assert n == calls.masks() > 3 * 10, (case, n, calls.shapes)  # every record's mask, in >10 calls
    assert all((h, w) == (600, 900) for _, h, w in calls.shapes)


# -- the same records (and overlays) as the masks made at once ----------------------------------------
def old_predict_dataset(model: torch.nn.Module, dataset, batch_size: int) -> list[dict]:
    """`predict_dataset` before this round: `model.postprocess` (every mask of a batch at once)."""
    from torch.utils.data import DataLoader

    from mobileinst.data.loader import collate
    from mobileinst.evaluate.coco_eval import instances_to_coco_json
    from mobileinst.models.postprocess import evaluation_config
    records = []
    with torch.no_grad():
        for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            outputs = model.postprocess(model.inference_outputs(images), tuple(images.shape[-2:]),
                                        [tuple(t["size"]) for t in targets],
                                        [tuple(t["orig_size"]) for t in targets],
                                        evaluation_config(model.inference))
            for t, out in zip(targets, outputs):
                records += instances_to_coco_json(int(t["image_id"]), out["labels"].numpy(),
                                                  out["scores"].numpy(), out["masks"].numpy(),
                                                  dataset.cat_ids)
    return records


def test_in_run_evaluation_records_are_the_masks_made_at_once(tmp_path, monkeypatch):
    """The synthetic val set (originals of their own sizes, padded batches of 2), each mask made
    alone (MASK_CHUNK_BYTES 1): the records equal the old path's, bit for bit."""
    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.config import load_data_config
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.data.transforms import EvalTransform
    from mobileinst.evaluate.evaluator import predict_dataset
    from mobileinst.infer import results
    split = load_data_config(make_synthetic_coco(tmp_path / "data", n_train=1, n_val=3, seed=0)).val
    dataset = CocoInstances(split.json, split.images, EvalTransform(64))
    model = tiny_model(num_queries=20)
    before = old_predict_dataset(model, dataset, batch_size=2)
    monkeypatch.setattr(results, "MASK_CHUNK_BYTES", 1)
    calls = MaskCalls(monkeypatch)
    after = predict_dataset(model, dataset, batch_size=2, progress=False)
    assert len(after) > 3 * 20 and after == before  # more than a query's one label: multi_label
    assert {k for k, _, _ in calls.shapes} == {1}


def test_the_in_run_evaluation_decodes_no_ground_truth_mask(tmp_path, monkeypatch):
    """Training's val set (`build_val_set`) reads images only: the evaluation scores against the
    json, so no annotation is rasterised at the original size; the records are those of a set
    that decodes them."""
    from mobileinst.data import coco
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.evaluate.evaluator import predict_dataset
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.data import build_val_set
    cfg = TrainConfig(data=str(make_synthetic_coco(tmp_path / "data", n_train=1, n_val=3, seed=0)), imgsz=64)
    decoded = []
    real = coco.decode_segmentation
    monkeypatch.setattr(coco, "decode_segmentation", lambda *a: decoded.append(1) or real(*a))
    val = build_val_set(cfg)
    model = tiny_model(num_queries=20)
    records = predict_dataset(model, val, batch_size=2, progress=False)
    assert decoded == [] and len(records) > 3 * 20
    val.with_masks = True  # the same set decoding its annotations
    assert predict_dataset(model, val, batch_size=2, progress=False) == records and decoded


def test_predict_records_and_overlay_are_the_masks_made_at_once(tmp_path, monkeypatch):
    """`predict --conf 0`, one mask at a time, writes the predictions.json and the overlay that
    the masks made at once (`Predictor` without lazy_masks, `draw_instances` of the array) give."""
    from mobileinst.data.coco import read_rgb
    from mobileinst.infer import results
    from mobileinst.infer.factory import load_predictor
    from mobileinst.utils import write_image
    from mobileinst.viz import color, draw_instances
    weights, src = tiny_checkpoint(tmp_path / "w.pt"), tmp_path / "img" / "p.png"
    src.parent.mkdir()
    cv2.imwrite(str(src), cv2.cvtColor(photo(300, 450), cv2.COLOR_RGB2BGR))
    image = read_rgb(src)  # as predict reads it
    eager = load_predictor(str(weights), backend="torch", imgsz=64, conf=0.0, device="cpu")(image)
    assert isinstance(eager.masks, np.ndarray) and len(eager) > 10
    expected = results.result_records(eager, 0, str(src), CAT_IDS)
    labels = [f"{n} {s:.2f}" for n, s in zip(eager.names, eager.scores)]
    write_image(tmp_path / "expected.jpg", draw_instances(image, eager.masks, labels,
                                                          [color(k) for k in range(len(eager))]))
    monkeypatch.setattr(results, "MASK_CHUNK_BYTES", 1)
    calls = MaskCalls(monkeypatch)
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(weights), "--source", str(src.parent), "--out-dir",
                 str(out), "--conf", "0", "--imgsz", "64", "--device", "cpu"]) == 0
    assert json.loads((out / "predictions.json").read_text()) == json.loads(json.dumps(expected))
    assert (out / "overlays" / "p.png.jpg").read_bytes() == (tmp_path / "expected.jpg").read_bytes()
    assert {k for k, _, _ in calls.shapes} == {1}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_predict_conf_0_of_a_4000x4000_photo_keeps_its_memory_bounded(tmp_path):
    """~95 kept instances of a 4000 x 4000 photo were 1.5 GB of masks at once: the old code
    peaked above 2.2 GB here (`--conf 0` of a 6000 x 6000 one at 4.4 GB); made a few at a time,
    0.81-0.87 GB (the photo, its overlay and one mask's temporaries): the bound is 1.5 GiB.
    The child runs with glibc's default allocator settings: under the CLI's `keep_freed_memory`
    (no mmap, no trim) the same run peaked anywhere from 0.85 to 2.1 GB, the freed per-mask
    temporaries fragmenting the heap (an open item of issue 23)."""
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "big.jpg"), photo(4000, 4000))
    out = tmp_path / "out"
    child = PEAK_CHILD.replace("from mobileinst.cli import main",
                               "import mobileinst.cli as cli\ncli.keep_freed_memory = lambda: False\nmain = cli.main")
    cmd = [sys.executable, "-c", child, "predict", "--weights", str(tiny_checkpoint(tmp_path / "w.pt")),
           "--source", str(tmp_path / "img"), "--out-dir", str(out), "--conf", "0", "--imgsz", "64",
           "--device", "cpu", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")]
    assert p.returncode == 0 and line, p.stderr[-2000:]
    _, code, peak = line[0].split()
    records = json.loads((out / "predictions.json").read_text())
    assert code == "0" and len(records) >= 50  # at once: >= 50 x 16 MB = 0.8 GB of masks alone
    assert int(peak) < 1.5 * 2**30, f"predict peaked at {int(peak) / 2**20:.0f} MiB"


# -- ncnn: pnnx's files renamed into place, never copied -----------------------------------------------
def fake_pnnx(monkeypatch, fail: str | None = None) -> list[Path]:
    """A `pnnx` module whose export writes what pnnx writes beside its .pt (the .pt, pnnx's own
    files, model.ncnn.param and a 1 MB model.ncnn.bin); fail "midway": it raises after half of
    the .bin. Returns the folders it wrote into."""
    folders: list[Path] = []

    def export(graph, pt, inputs, **kwargs):
        pt = Path(pt)
        folders.append(pt.parent)
        for name in (pt.name, "model.pnnx.param", "model.pnnx.bin", "model_pnnx.py",
                     "model.ncnn.param", "model_ncnn.py"):
            (pt.parent / name).write_text(f"{name} of this export\n")
        with open(pt.with_suffix(".ncnn.bin"), "wb") as f:
            f.write(bytes(1 << 19))
            if fail == "midway":
                raise RuntimeError("pnnx crashed while writing model.ncnn.bin")
            f.write(bytes(1 << 19))
    module = types.ModuleType("pnnx")
    module.export, module.__spec__ = export, ModuleSpec("pnnx", None)
    monkeypatch.setitem(sys.modules, "pnnx", module)
    return folders


def export_ncnn(out: Path) -> list[str]:
    return ["export", "--model", "mobileinst-topformer-t", "--num-classes", "4", "--format", "ncnn",
            "--imgsz", "64", "--out", str(out)]


def test_ncnn_files_are_renamed_into_place_never_copied(tmp_path, monkeypatch, capsys):
    """/tmp on another file system (os.rename: EXDEV, so shutil.move copies) and a copy that dies
    as it opens the final name: the export still succeeds, because pnnx wrote inside the
    destination and each file was renamed there; the files get the mode a plain write gives."""
    out = tmp_path / "m_ncnn"
    folders = fake_pnnx(monkeypatch)
    finals = {str(out / "model.ncnn.param"), str(out / "model.ncnn.bin")}
    real_open, real_rename = builtins.open, os.rename

    def open_(file, mode="r", *args, **kwargs):
        if str(file) in finals and any(m in mode for m in "wax"):
            real_open(file, mode).close()  # the copy had begun: a half (empty) file
            raise OSError(errno.EIO, "killed while copying")
        return real_open(file, mode, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "rename", rename)
    old = os.umask(0o027)
    try:
        assert main(export_ncnn(out)) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    assert folders and all(f.parent == out for f in folders)  # the same file system as the files
    assert sorted(p.name for p in out.iterdir()) == ["mobileinst.json", "model.ncnn.bin", "model.ncnn.param"]
    assert (out / "model.ncnn.bin").stat().st_size == 1 << 20
    assert (out / "model.ncnn.param").read_text() == "model.ncnn.param of this export\n"
    assert all((out / n).stat().st_mode & 0o777 == 0o640 for n in ("model.ncnn.bin", "model.ncnn.param"))


# (case, the folder before the export: {name: bytes} or None (absent))
NCNN_FAILURES = [
    ("a new folder", None),
    ("over an earlier export", {"model.ncnn.param": b"earlier param", "model.ncnn.bin": b"earlier bin",
                                "mobileinst.json": b"{}"}),
]


@pytest.mark.parametrize("case,before", NCNN_FAILURES, ids=[c[0] for c in NCNN_FAILURES])
def test_a_failed_ncnn_conversion_leaves_no_file(tmp_path, monkeypatch, capsys, case, before):
    """pnnx dies half-way through model.ncnn.bin: one line naming the step, no file under a
    final name (an earlier export's files intact), no temporary left, no folder made."""
    out = tmp_path / "m_ncnn"
    if before is not None:
        out.mkdir()
        for name, data in before.items():
            (out / name).write_bytes(data)
    fake_pnnx(monkeypatch, fail="midway")
    assert main(export_ncnn(out)) == 2
    one_line_error(capsys, "ncnn conversion of mobileinst-topformer-t failed", "pnnx crashed")
    if before is None:
        assert not out.exists()
    else:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_write_error_while_renaming_names_the_folder(tmp_path, monkeypatch, capsys):
    """The rename itself failing (a read-only remount, say) is one line naming the destination and
    the errno; pnnx's temporary folder is removed."""
    out = tmp_path / "m_ncnn"
    fake_pnnx(monkeypatch)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name.startswith("model.ncnn"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    assert main(export_ncnn(out)) == 2
    one_line_error(capsys, str(out), "could not be written: Read-only file system (EROFS)")
    assert not out.exists()
