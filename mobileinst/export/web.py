"""`mobileinst export --format web`: a static folder that runs the model in a browser.

    mobileinst export --weights best.pt --format web --out best_web   # then: mobileinst serve best_web
    export_web(model, info, "best_web", imgsz=(320, 320))              # the Python API

The folder (any static server serves it; `mobileinst serve` adds the cross-origin isolation
headers that multi-threaded WASM needs):

    index.html, app.js     the page: pick or drop images, masks drawn, confidence slider, timings
    tracker.js, video.js   tracking of camera frames: ports of `track/association_np.py` and
                           `infer/tracker.py` (kernel association, track ids), and of
                           `infer/video.py` (kernel reuse, the raw outputs decoded)
    model.onnx             the post-processed graph (`export_onnx(postprocess=True)`: labels,
                           scores, masks at the input size), fixed size, uint8 input; with
                           `--int8 --calib DATA` its static int8 copy (`quantize.quantize_int8`,
                           QDQ; the post-processing stays float), which onnxruntime-web runs too
    track.onnx, track-features.onnx
                           the two graphs `mobileinst track --backend onnxruntime` runs, at the
                           same fixed size, uint8 input, float (also with --int8): the raw-output
                           key-frame graph (every query's logits, objectness and kernel: the
                           association needs all N, which the post-processed graph does not
                           return) and the features graph of the frames between key frames
    model.json             metadata the page reads (`web_metadata`): class names, colours, input
                           size and pad pixel, output names, confidence, onnxruntime-web version,
                           the tracking graphs and settings (`track_metadata`)
    ort.min.js, ort-wasm-simd-threaded.jsep.{mjs,wasm}
                           onnxruntime-web (WASM, and WebGPU where the browser has it), copied from
                           the npm package `make web-deps` installs (ORT_WEB_VERSION) into .web/

The page does what `mobileinst predict --backend onnxruntime` does with a fixed-size graph
(`infer/preprocess.py` letterbox with OpenCV's bilinear resize, `infer/results.py` crop and
resize of the masks), so its instances equal Python's (tests/test_web.py checks it in Chromium);
its camera tracks equal `mobileinst track --backend onnxruntime`'s on the same graphs
(tests/test_web_tracker.py in Node, tests/test_web.py in Chromium).
Nothing is fetched from the network when the page runs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import MobileInstError
from ..infer.onnx_graph import example_images
from ..models.model_info import RAW_OUTPUTS, ModelInfo, read_metadata
from ..utils import current_umask, write_json
from ..viz import color
from .onnx import export_onnx
from .quantize import quantize_int8

log = logging.getLogger("mobileinst.export")

ORT_WEB_VERSION = "1.31.1"  # the onnxruntime-web release `make web-deps` installs (npm, exact pin)
ORT_FILES = ("ort.min.js", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
ORT_ENV = "MOBILEINST_ORT_WEB"  # a dist/ folder of onnxruntime-web, instead of .web/
ORT_SUBDIR = Path(".web") / "node_modules" / "onnxruntime-web" / "dist"
ASSETS = ("index.html", "app.js", "tracker.js", "video.js")  # the page, in mobileinst/export/web_assets/
GRAPH_NAME, META_NAME = "model.onnx", "model.json"
TRACK_GRAPHS = {"full": "track.onnx", "features": "track-features.onnx"}  # export --part -> file
WEB_FORMAT = "mobileinst-web"
WEB_FORMAT_VERSION = 2  # 2: the tracking graphs and model.json's "track"
TRACK_REUSE, TRACK_PATIENCE = 1, 10  # the page's defaults, `mobileinst track`'s
DEFAULT_CONF = 0.1  # the graph keeps instances above it: the lowest the page's slider shows
DISPLAY_CONF = 0.3  # the slider's start, as `mobileinst predict --conf`
PALETTE_SIZE = 64   # instance colours (viz.color), by rank as in predict's overlays


def ort_candidates(ort_dir: str | Path | None = None) -> list[Path]:
    """Where onnxruntime-web's dist files are looked for, in order: `ort_dir`, $MOBILEINST_ORT_WEB,
    .web/ of the source checkout, .web/ of the working directory."""
    found = [Path(p) for p in (ort_dir, os.environ.get(ORT_ENV)) if p]
    found += [Path(__file__).resolve().parents[2] / ORT_SUBDIR, Path.cwd() / ORT_SUBDIR]
    return list(dict.fromkeys(found))


def find_ort_dir(ort_dir: str | Path | None = None) -> Path:
    """The first candidate folder holding every file of ORT_FILES; MobileInstError (one line,
    naming where it looked and the make target) when none does."""
    places = ort_candidates(ort_dir)
    for place in places:
        if all((place / f).is_file() for f in ORT_FILES):
            return place
    raise MobileInstError(
        f"--format web needs onnxruntime-web's files ({', '.join(ORT_FILES)}), not found in "
        f"{', '.join(map(str, places))}: run `make web-deps` (npm install onnxruntime-web@"
        f"{ORT_WEB_VERSION} into .web/) or set {ORT_ENV} to the dist/ folder of onnxruntime-web")


def ort_version(dist: Path) -> str:
    """The version in the package.json above `dist` ("unknown" when unreadable)."""
    try:
        return str(json.loads((dist.parent / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def track_metadata(key_graph: Path) -> dict[str, Any]:
    """model.json's "track": the tracking graphs, their outputs and decode, the tracker's defaults
    (the start score is the page's confidence, the keep score half of it, as `mobileinst track`)."""
    info = ModelInfo.from_metadata(key_graph, read_metadata(key_graph))
    return {"key": TRACK_GRAPHS["full"], "features": TRACK_GRAPHS["features"],
            "outputs": {name: name for name in RAW_OUTPUTS}, "mask_upsample": info.mask_upsample,
            "mask_threshold": info.inference.mask_threshold, "reuse": TRACK_REUSE,
            "patience": TRACK_PATIENCE}


def web_metadata(graph_meta: dict[str, str], conf: float, version: str, int8: bool = False,
                 track: dict[str, Any] | None = None) -> dict[str, Any]:
    """model.json: what the page needs, from the exported graph's own metadata (and `track`,
    `track_metadata` of the tracking graphs)."""
    size = json.loads(graph_meta["input_size"])
    return {
        "producer": "mobileinst", "format": WEB_FORMAT, "format_version": WEB_FORMAT_VERSION,
        "mobileinst_version": __version__, "model": GRAPH_NAME,
        "model_name": graph_meta.get("model_name", "?"),
        "class_names": json.loads(graph_meta["class_names"]), "cat_ids": json.loads(graph_meta["cat_ids"]),
        "colors": [list(color(i)) for i in range(PALETTE_SIZE)],
        # infer/preprocess.py: letterbox into `size`, pad bottom/right with the rounded mean pixel
        "input": {"name": graph_meta.get("input_name", "images"), "dtype": "uint8", "size": size,
                  "layout": "NCHW RGB 0..255", "pad": [124, 116, 104]},
        "outputs": {"labels": "labels", "scores": "scores", "masks": "masks"},
        "conf": conf, "default_conf": max(conf, DISPLAY_CONF),
        "max_det": int(graph_meta.get("max_det", 100)),
        "mask_threshold": float(graph_meta.get("mask_threshold", 0.45)),
        "ort_web_version": version, "source": graph_meta.get("source", ""), "int8": int8,
        "track": track,
    }


def check_web_out(out: Path) -> None:
    """Refuse an --out that exists and is not a web export (it would be replaced whole)."""
    if out.exists() and not out.is_dir():
        raise MobileInstError(f"{out}: the web export (--out) is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ok = json.loads((out / META_NAME).read_text()).get("format") == WEB_FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise MobileInstError(f"{out}: the folder holds files that are not a `--format web` "
                                  "export, which writing it would replace; choose another --out")


def copy_files(src: Path, names: tuple[str, ...], dst: Path) -> None:
    for name in names:
        shutil.copyfile(src / name, dst / name)


def write_example_images(folder: str | Path, sizes: list[tuple[int, int]], seed: int = 10) -> dict[str, Any]:
    """Natural-looking test images (`example_images`, seed + i), one per (H, W) of `sizes`,
    written as PNG files image_{i}_{W}x{H}.png into `folder` -> {file name: RGB array}
    (tests/test_web.py and benchmarks/web_latency.py feed them to the page)."""
    import cv2
    images = {}
    for i, (h, w) in enumerate(sizes):
        img = example_images(1, h, w, seed=seed + i)[0]
        name = f"image_{i}_{w}x{h}.png"
        cv2.imwrite(str(Path(folder) / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images[name] = img
    return images


def export_track_graphs(model, info, folder: Path, imgsz: tuple[int, int], metadata: dict[str, str] | None,
                        simplify: bool, opset: int) -> dict[str, Any]:
    """The two graphs `mobileinst track --backend onnxruntime` runs (TRACK_GRAPHS: raw key-frame
    and features), fixed size, uint8 input, float, into `folder` -> model.json's "track"."""
    for part, name in TRACK_GRAPHS.items():
        export_onnx(model, folder / name, imgsz=imgsz, part=part, input_dtype="uint8", simplify=simplify,
                    opset=opset, class_names=list(info.class_names), cat_ids=list(info.cat_ids),
                    metadata=metadata or {})
    return track_metadata(folder / TRACK_GRAPHS["full"])


def export_web(model, info, out: str | Path, imgsz: tuple[int, int], conf: float | None = None,
               max_det: int | None = None, metadata: dict[str, str] | None = None,
               ort_dir: str | Path | None = None, simplify: bool = True, opset: int = 18,
               calib: str | Path | None = None, calib_n: int = 64) -> Path:
    """Write the web app folder `out` (module docstring) for a MobileInst `model` described by
    `info` (a ModelInfo); written into a temporary folder beside it and renamed at the end, so a
    failure leaves nothing half-written. conf: the graph's cut (default DEFAULT_CONF); calib:
    calibration images (DATA yaml, folder or glob) for an int8 graph instead of the float one."""
    dist = find_ort_dir(ort_dir)  # before the (slow) export
    out = Path(out)
    check_web_out(out)
    conf = DEFAULT_CONF if conf is None else float(conf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        graph = export_onnx(model, tmp / GRAPH_NAME, imgsz=imgsz, postprocess=True, conf=conf,
                            max_det=max_det, input_dtype="uint8", simplify=simplify, opset=opset,
                            class_names=list(info.class_names), cat_ids=list(info.cat_ids),
                            metadata=metadata or {})
        meta = read_metadata(graph)
        if calib is not None:
            float_graph = graph.rename(tmp / "model-float.onnx")
            graph = quantize_int8(float_graph, tmp / GRAPH_NAME, calib, n=calib_n)
            float_graph.unlink()
        track = export_track_graphs(model, info, tmp, imgsz, metadata, simplify, opset)
        write_json(tmp / META_NAME, web_metadata(meta, conf, ort_version(dist), calib is not None, track),
                   indent=1)
        copy_files(Path(__file__).with_name("web_assets"), ASSETS, tmp)
        copy_files(dist, ORT_FILES, tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it 0700
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an older export at `out` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_web(args, model, info, hw: tuple[int, int] | None, meta: dict[str, str], out: Path) -> Path:
    """`mobileinst export --format web` after the model is loaded (export/command.py)."""
    if args.dynamic or args.part != "full":
        raise MobileInstError("--format web exports the full, fixed-size graph (no --dynamic, no "
                              "--part features)")
    if args.input_dtype != "uint8":
        raise MobileInstError("--format web takes uint8 images (the page's pixels): leave out --input-dtype")
    if hw is None:  # the checkpoint's training size, square (a multiple of 32)
        side = -(-int(info.imgsz) // 32) * 32
        hw = (side, side)
    return export_web(model, info, out, hw, conf=args.conf, max_det=args.max_det, metadata=meta,
                      simplify=args.simplify, opset=args.opset,
                      calib=args.calib if args.int8 else None, calib_n=args.calib_n)
