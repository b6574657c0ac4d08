"""`mobileinst benchmark`: option errors, install hints, the parity measure, and the table / csv /
json of a real run (a tiny seeded checkpoint on a tiny synthetic set, onnx, 2 timed runs) whose
AP equals `mobileinst val`'s for the same file; `-m slow`: every installed runtime, with int8."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from test_export import make_realistic, save_model_checkpoint, voc_image

from mobileinst import benchmark
from mobileinst.cli import main
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst import build_model

NAMES = ["circle", "square", "triangle", "ring"]
PARITY = re.compile(r"^(\d+)/(\d+) inst( \(\+\d+ extra\))?(, IoU>=[01]\.\d{3}, \|dscore\|(=0|<=\de-\d+))?$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint 'trained' at 128 px: seeded weights made realistic, DATA yaml with 3 val images
    whose ground truth is that model's own confident instances, so that AP is far from 0)."""
    root = tmp_path_factory.mktemp("bench")
    data = make_synthetic_coco(root / "data", n_train=2, n_val=3, seed=2)
    torch.manual_seed(0)
    model = make_realistic(build_model("mobileinst-topformer-t", num_classes=4), voc_image())
    ckpt = save_model_checkpoint(model, root / "tiny.pt", imgsz=128, class_names=NAMES)
    pseudo_ground_truth(ckpt, data)
    return ckpt, data


def pseudo_ground_truth(ckpt: Path, data: Path, conf: float = 0.3, per_image: int = 10) -> None:
    """Replace the val annotations by the torch predictor's instances above `conf` (at most
    `per_image`, none overlapping another by IoU > 0.5)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.config import load_data_config
    from mobileinst.data.rle import encode_mask
    cfg = load_data_config(data)
    gt = json.loads(cfg.val.json.read_text())
    cat_ids = CocoInstances(cfg.val.json, cfg.val.images).cat_ids
    predictor = benchmark.eager_predictor(ckpt, (128, 128), conf=conf)  # the benchmark's reference
    annotations = []
    for info in gt["images"]:
        import cv2
        image = cv2.cvtColor(cv2.imread(str(cfg.val.images / info["file_name"])), cv2.COLOR_BGR2RGB)
        result = predictor(image)
        kept: list[dict] = []
        for k in np.argsort(-np.asarray(result.scores)):
            rle = encode_mask(result.masks[k])
            if len(kept) == per_image or not result.masks[k].any():
                continue
            if kept and mask_utils.iou([rle], [a["segmentation"] for a in kept], [0] * len(kept)).max() > 0.5:
                continue
            kept.append({"id": len(annotations) + len(kept) + 1, "image_id": info["id"],
                         "category_id": int(cat_ids[int(result.labels[k])]), "segmentation": rle,
                         "area": int(result.masks[k].sum()), "iscrowd": 0,
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        annotations += kept
    assert len(annotations) >= 6, "the fixture needs instances to score"
    gt["annotations"] = annotations
    cfg.val.json.write_text(json.dumps(gt))


@pytest.fixture(scope="module")
def onnx_run(tiny, tmp_path_factory):
    """One CLI run: --formats onnx ncnn --runs 2 --warmup 1 --threads 1, ncnn made 'missing'
    (so the skip line is tested without uninstalling anything). (out folder, stdout)."""
    ckpt, data = tiny
    out = tmp_path_factory.mktemp("run") / "bench"
    mp = pytest.MonkeyPatch()
    real = benchmark.missing_packages
    mp.setattr(benchmark, "missing_packages", lambda f: ["pnnx"] if f == "ncnn" else real(f))
    import contextlib
    import io
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["benchmark", "--weights", str(ckpt), "--data", str(data), "--formats", "onnx",
                       "ncnn", "--runs", "2", "--warmup", "1", "--threads", "1", "--out", str(out)])
    finally:
        mp.undo()
    assert rc == 2, buf.getvalue()  # the table is written, but a requested format was not measured
    return out, buf.getvalue()


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--formats", "onxx"], "unknown format 'onxx'; did you mean 'onnx'?"),
    (["--formats", "tflite"], "unknown format 'tflite'"),
    (["--threads", "0"], "--threads must be in [1, 1024], got 0"),
    (["--threads", "1", "-2"], "--threads must be in [1, 1024], got -2"),
    (["--runs", "0"], "--runs must be in [1, 1000000], got 0"),
    (["--warmup", "-1"], "--warmup must be in [0, 1000000], got -1"),
    (["--imgsz", "100"], "--imgsz must be a multiple of 32"),
    (["--imgsz", "16"], "--imgsz must be in [32, 4096], got 16"),
    (["--conf", "1.5"], "--conf must be in [0.0, 1.0], got 1.5"),
    (["--calib-n", "0"], "--calib-n must be in [1, 100000], got 0"),
])
def test_option_errors(extra, message, tmp_path, capsys):
    weights, data = tmp_path / "w.pt", tmp_path / "d.yaml"
    weights.write_bytes(b"x")
    data.write_text("x")
    assert main(["benchmark", "--weights", str(weights), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mobileinst benchmark: error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_missing_files(tmp_path, capsys):
    data = tmp_path / "d.yaml"
    data.write_text("x")
    assert main(["benchmark", "--weights", str(tmp_path / "none.pt"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"--weights {tmp_path / 'none.pt'}: no such checkpoint file" in err
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert main(["benchmark", "--weights", str(weights), "--data", str(tmp_path / "no.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'no.yaml'}: no such DATA yaml" in err and "Traceback" not in err
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["benchmark", "--weights", str(weights), "--data", str(data), "--out", str(out)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err


def test_cfg_file(tmp_path, monkeypatch, capsys):
    """--cfg FILE.yaml holds any option; the command line overrides it; typos are refused."""
    seen = {}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda weights, data, **kw: seen.update(
        weights=weights, data=data, **kw) or [])  # no rows: nothing skipped
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("weights: w.pt\ndata: d.yaml\nformats: [onnx, openvino]\nthreads: [1, 2]\n"
                   "runs: 7\nint8: true\n")
    assert main(["benchmark", "--cfg", str(cfg), "--runs", "9", "--no-int8"]) == 0
    assert seen["weights"] == "w.pt" and seen["data"] == "d.yaml"
    assert seen["formats"] == ["onnx", "openvino"] and seen["threads"] == [1, 2]
    assert seen["runs"] == 9 and seen["int8"] is False and seen["warmup"] == 5  # CLI > file > default
    cfg.write_text("weights: w.pt\ndata: d.yaml\nthread: 2\n")
    assert main(["benchmark", "--cfg", str(cfg)]) == 2
    assert "unknown option 'thread'; did you mean 'threads'?" in capsys.readouterr().err
    cfg.write_text("data: d.yaml\n")
    assert main(["benchmark", "--cfg", str(cfg)]) == 2
    assert "benchmark needs --weights" in capsys.readouterr().err


def test_install_hint(monkeypatch):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None)
    assert benchmark.install_hint("ncnn") == "ncnn: not installed (no pnnx, ncnn): pip install 'mobileinst[ncnn]'"
    assert benchmark.install_hint("litert").endswith("pip install 'mobileinst[litert]'")
    assert benchmark.install_hint("onnx").endswith("pip install 'mobileinst[export]'")


# -- parity --------------------------------------------------------------------------------------
def _record(image_id, cat, score, box):
    import numpy as np

    from mobileinst.data.rle import encode_mask
    m = np.zeros((40, 40), bool)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = True
    return {"image_id": image_id, "category_id": cat, "score": score, "segmentation": encode_mask(m)}


def test_parity_measure():
    ref = [_record(1, 3, 0.9, (0, 0, 10, 10)), _record(1, 7, 0.5, (20, 20, 30, 30)),
           _record(2, 3, 0.8, (5, 5, 25, 25)), _record(2, 3, 0.1, (30, 30, 40, 40))]
    same = benchmark.parity(ref, ref, conf=0.3)
    assert (same["parity_matched"], same["parity_total"], same["parity_extra"]) == (3, 3, 0)
    assert benchmark.format_parity(same) == "3/3 inst, IoU>=1.000, |dscore|=0"
    got = [_record(1, 3, 0.90003, (0, 0, 10, 10)),   # score moved by 3e-5
           _record(1, 3, 0.5, (20, 20, 30, 30)),     # right mask, wrong category: not a match
           _record(2, 3, 0.79, (5, 5, 25, 24)),      # one row of pixels less: IoU 0.95
           _record(2, 3, 0.31, (30, 30, 40, 40))]    # above conf here, below in ref: not extra
    p = benchmark.parity(ref, got, conf=0.3)
    assert (p["parity_matched"], p["parity_total"], p["parity_extra"]) == (2, 3, 1)
    assert p["parity_min_iou"] == pytest.approx(0.95)
    assert p["parity_max_dscore"] == pytest.approx(0.01)
    assert benchmark.format_parity(p) == "2/3 inst (+1 extra), IoU>=0.950, |dscore|<=1e-2"
    small = benchmark.parity(ref, got[:1], conf=0.3)
    assert benchmark.format_parity(small) == "1/3 inst, IoU>=1.000, |dscore|<=3e-5"
    assert benchmark.format_parity(benchmark.parity(ref, [], 0.3)) == "0/3 inst"
    empty = [_record(3, 3, 0.6, (0, 0, 0, 0))]  # a tiny instance lost in the resize, in both
    assert benchmark.format_parity(benchmark.parity(empty, empty, 0.3)) == "1/1 inst, IoU>=1.000, |dscore|=0"


# -- a real run ----------------------------------------------------------------------------------
def test_benchmark_onnx_table(tiny, onnx_run):
    """Rows torch, onnx and a skipped ncnn; csv / json / stdout agree; onnx's AP is exactly
    `val --backend onnxruntime`'s for the same file; onnx matches the eager reference."""
    from mobileinst.evaluate.evaluator import validate
    ckpt, data = tiny
    out, stdout = onnx_run
    assert "ncnn: not installed (no pnnx): pip install 'mobileinst[ncnn]'" in stdout

    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [r["format"] for r in rows] == ["torch", "onnx", "ncnn"]
    assert list(rows[0]) == benchmark.COLUMNS
    assert rows[2]["status"].startswith("skipped: ncnn: not installed")
    table = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 4 and table[0].startswith("| format | threads | size MB | mask AP |")
    assert "| ncnn | - |" in table[3] and "pip install 'mobileinst[ncnn]'" in table[3]

    report = json.loads((out / "benchmark.json").read_text())
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    assert {"torch", "onnxruntime", "mobileinst"} <= set(machine["versions"])
    torch_row, onnx_row = report["rows"][:2]
    assert (torch_row["status"], onnx_row["status"]) == ("ok", "ok")
    assert torch_row["parity"].startswith("reference (")
    assert onnx_row["threads"] == 1 and onnx_row["timed_runs"] == 2 and onnx_row["val_images"] == 3
    onnx_file = Path(onnx_row["file"])
    assert onnx_file == out / "tiny.onnx" and onnx_file.is_file()
    assert onnx_row["size_mb"] == pytest.approx(onnx_file.stat().st_size / 1e6)
    assert torch_row["file_mb"] == pytest.approx(ckpt.stat().st_size / 1e6)
    assert 0.8 * onnx_row["size_mb"] < torch_row["size_mb"] < 1.2 * onnx_row["size_mb"]  # both fp32 weights
    for r in (torch_row, onnx_row):
        assert 0 < r["pre_ms"] and 0 < r["net_ms"] and 0 < r["post_ms"]
        assert r["total_ms"] == pytest.approx(r["pre_ms"] + r["net_ms"] + r["post_ms"])
        # the row's own process: ru_maxrss is its own high-water mark, not the (larger) parent's
        assert 100 < r["peak_rss_mib"] < r["vmhwm_mib"] + 30, r

    # AP: exactly what `mobileinst val --backend onnxruntime` says for the same file
    m = validate(str(onnx_file), str(data), backend="onnxruntime", threads=1)
    assert abs(onnx_row["mask_ap"] - m.AP) <= 1e-6 and abs(onnx_row["ap50"] - m.AP50) <= 1e-6
    assert float(rows[1]["mask_ap"]) == pytest.approx(m.AP, abs=1e-6)

    # parity: onnxruntime fp32 matches the eager reference on every instance above conf
    match = PARITY.match(onnx_row["parity"])
    assert match, onnx_row["parity"]
    assert onnx_row["parity_total"] == int(torch_row["parity"].split("(")[1].split()[0]) > 0
    assert onnx_row["parity_matched"] == onnx_row["parity_total"] and onnx_row["parity_extra"] == 0
    assert onnx_row["parity_min_iou"] >= 0.99 and onnx_row["parity_max_dscore"] <= 1e-3
    assert 0.1 < onnx_row["mask_ap"] <= 1 and 0.1 < torch_row["mask_ap"] <= 1  # not a trivial 0 = 0
    assert report["torch_val"]["mask_ap"] > 0
    assert not list(out.glob(".work-*")), "the scratch folder is removed after a clean run"


def test_timed_call_is_the_predictor(tiny, onnx_run):
    """The timed parts (prepare, network, decode) give exactly the predictor's own result."""
    import numpy as np

    from mobileinst.data.coco import read_rgb
    ckpt, data = tiny
    out, _ = onnx_run
    image = read_rgb(sorted((data.parent / "val").iterdir())[0])
    for predictor in (benchmark.eager_predictor(ckpt, (128, 128), conf=0.3),
                      benchmark.load_predictor(out / "tiny.onnx", backend="onnxruntime", conf=0.3)):
        parts, result = benchmark.timed_call(predictor, image, 0.3)
        expected = predictor(image)
        assert len(parts) == 3 and all(p > 0 for p in parts)
        assert len(result) == len(expected) > 0
        assert np.array_equal(result.labels, expected.labels)
        assert np.array_equal(result.scores, expected.scores)
        assert np.array_equal(result.masks, expected.masks)


# -- every installed runtime (slow) --------------------------------------------------------------
RUNTIME_MODULES = {"onnx": ["onnxruntime"], "openvino": ["openvino"], "ncnn": ["pnnx", "ncnn"],
                   "executorch": ["executorch"], "litert": ["litert_torch", "ai_edge_litert"],
                   "coreml": ["coremltools"]}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(RUNTIME_MODULES))
def test_benchmark_every_runtime(fmt, tiny, tmp_path):
    """Each installed runtime, with its int8 rows where its export has int8: AP equal to `val
    --backend X` on the exported file, parity with the eager reference (fp32: every instance)."""
    from mobileinst.evaluate.evaluator import validate
    for module in RUNTIME_MODULES[fmt]:
        pytest.importorskip(module)
    ckpt, data = tiny
    rows = benchmark.run_benchmark(ckpt, data, formats=[fmt], threads=[1, 2], runs=2, warmup=1,
                                   int8=True, calib_n=2, out=tmp_path / "b", verbose=False)
    by_name = {(r["format"], r["threads"]): r for r in rows}
    if fmt == "coreml":
        (row,) = [r for r in rows if r["format"] == "coreml"]
        assert row["size_mb"] > 0 and "converted" in row["status"]
        return
    int8 = fmt in benchmark.int8_exporters()
    names = ["torch", fmt] + ([f"{fmt}-int8"] if int8 else [])
    assert [(r["format"], r["threads"]) for r in rows] == [(n, t) for n in names for t in (1, 2)]
    for (name, threads), row in by_name.items():
        assert row["status"] == "ok", row
        if name == "torch":
            continue
        m = validate(row["file"], str(data), backend=benchmark.BACKEND[fmt], threads=threads)
        assert abs(row["mask_ap"] - m.AP) <= 1e-6 and abs(row["ap50"] - m.AP50) <= 1e-6, (row, m)
        assert PARITY.match(row["parity"]), row["parity"]
        if name == fmt:
            assert row["parity_matched"] == row["parity_total"] > 0, row["parity"]
            assert row["parity_min_iou"] >= 0.99 and row["parity_max_dscore"] <= 1e-3
        else:
            assert row["d_ap_vs_fp32"] == pytest.approx(row["mask_ap"] - by_name[fmt, threads]["mask_ap"])
