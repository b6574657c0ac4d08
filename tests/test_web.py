"""`mobileinst export --format web` and `mobileinst serve` (issue 25), the page run in headless Chromium.

The tests marked `web` need Debian's `chromium` and onnxruntime-web's files in .web/: `make
test-web` installs both and runs them; the default suite (`-m "not web"`) leaves them out. The
browser is driven over the DevTools protocol with the standard library
(`benchmarks/web_latency.py: Chromium`); nothing is downloaded at run time.

The parity test exports a MobileInst-TopFormer-T with random weights (class / objectness biases
at 0, as tests/test_predict_robust.py: ~40-70 instances per image above conf 0.2), serves the
folder on a free localhost port, runs the page on three generated PNGs (one at the input size,
one scaled down into it, one scaled up) and compares its instances with `mobileinst predict
--backend onnxruntime`'s predictor on the same graph and images: same count, each pair of the
same class with mask IoU >= 0.99 and scores within 1e-3. The tracking test runs a generated clip
through the page's camera path (track.onnx / track-features.onnx in onnxruntime-web, video.js,
tracker.js) and compares it with `mobileinst track --backend onnxruntime`'s `VideoPredictor` on
the same graphs: the same track ids frame by frame (tests/test_web_tracker.py checks the same
JavaScript in Node, fed exactly what the Python tracker receives).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mobileinst import build_model
from mobileinst.checkpoint import save_checkpoint
from mobileinst.cli import main
from mobileinst.errors import MobileInstError
from mobileinst.serve import ISOLATION_HEADERS, make_server
from test_web_tracker import assert_same_tracks, clip_frames, page_settings, unrle

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 128
CLASSES = ["a", "b", "c"]
EXPORT_CONF = 0.2   # the graph keeps instances above it
CONF = 0.3          # compared at predict's default confidence
SIZES = [(128, 128), (120, 160), (90, 100)]  # (H, W): as is, scaled down, scaled up
ARTEFACTS = ROOT / "runs" / "web"  # the screenshot (git-ignored)
CLIP_FRAMES = 8  # the tracking test's clip, served as clip/00000.png ...
# its tracker settings (`VideoPredictor` options; the page's URL parameters): ~30 of 100 slots
# alive per frame, tracks starting and ending
TRACKING = {"reuse": 2, "conf": 0.3, "keep_conf": 0.29, "patience": 2}


def _bench():
    spec = importlib.util.spec_from_file_location("web_latency", ROOT / "benchmarks" / "web_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def serve_thread(folder: Path, handler=None) -> tuple[ThreadingHTTPServer, str]:
    server = (make_server(folder, port=0) if handler is None else
              ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder))))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


# -- no browser needed (in the default suite) -------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        model.instance_decoder.class_head.bias.zero_()
        model.instance_decoder.objectness_head.bias.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": CLASSES, "cat_ids": [1, 2, 3], "train_config": {"imgsz": IMGSZ}}, path)
    return path


def test_serve_sends_isolation_headers_and_wasm_mime(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><p>hi")
    (tmp_path / "a.wasm").write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "b.mjs").write_text("export default 1;")
    server, base = serve_thread(tmp_path)
    try:
        for name, mime in [("", "text/html"), ("a.wasm", "application/wasm"), ("b.mjs", "text/javascript")]:
            with urllib.request.urlopen(base + name) as r:
                assert r.headers["Content-Type"].startswith(mime), (name, r.headers["Content-Type"])
                for key, value in ISOLATION_HEADERS.items():
                    assert r.headers[key] == value
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_folder_that_is_not_a_web_export(tmp_path, capsys):
    with pytest.raises(MobileInstError, match="no such folder"):
        make_server(tmp_path / "nope")
    with pytest.raises(MobileInstError, match="no index.html"):
        make_server(tmp_path)
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_export_web_without_onnxruntime_web_is_one_clear_error(checkpoint, tmp_path, monkeypatch, capsys):
    from mobileinst.export import web
    empty = tmp_path / "no_ort"
    empty.mkdir()
    monkeypatch.setattr(web, "ort_candidates", lambda ort_dir=None: [empty])
    out = tmp_path / "site"
    assert main(["export", "--weights", str(checkpoint), "--format", "web", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make web-deps" in err and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["no_ort"]


def test_export_web_refuses_int8_without_calib_and_a_foreign_folder(checkpoint, tmp_path, capsys):
    assert main(["export", "--weights", str(checkpoint), "--format", "web", "--int8",
                 "--out", str(tmp_path / "w")]) == 2
    assert "--int8 needs --calib" in capsys.readouterr().err
    from mobileinst.export.web import check_web_out
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(MobileInstError, match="not a `--format web` export"):
        check_web_out(tmp_path)


# -- the browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def web_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "site"
    rc = main(["export", "--weights", str(checkpoint), "--format", "web", "--out", str(out),
               "--conf", str(EXPORT_CONF)])
    assert rc == 0, "export --format web failed (run `make web-deps` first)"
    return out


@pytest.fixture(scope="module")
def site(web_dir, tmp_path_factory):
    """The export plus test files, served with `mobileinst serve`'s server: images, a generated
    clip's frames (clip/, PNG), a text file, a 6000x6000 PNG, a truncated PNG, and copies of the
    export without / with a broken model.json."""
    from mobileinst.export.web import write_example_images
    root = tmp_path_factory.mktemp("site") / "www"
    shutil.copytree(web_dir, root)
    images = write_example_images(root, SIZES, seed=20)
    clip = clip_frames(tmp_path_factory.mktemp("clip"), CLIP_FRAMES)
    (root / "clip").mkdir()
    for i, frame in enumerate(clip):
        cv2.imwrite(str(root / "clip" / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    (root / "notes.txt").write_text("not an image")
    png = (root / next(iter(images))).read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    huge = np.zeros((6000, 6000, 3), np.uint8)
    huge[1000:5000, 1500:4500] = (200, 60, 60)
    cv2.imwrite(str(root / "huge.png"), huge)
    no_track = json.loads((web_dir / "model.json").read_text())
    del no_track["track"]  # an export from before the page tracked
    for name, meta in [("no_meta", None), ("bad_json", "{not json"), ("bad_field", '{"format": "x"}'),
                       ("no_track", json.dumps(no_track))]:
        shutil.copytree(web_dir, root / name)
        (root / name / "model.json").unlink()
        if meta is not None:
            (root / name / "model.json").write_text(meta)
    server, base = serve_thread(root)
    yield {"root": root, "base": base, "images": images, "clip": clip}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():  # with Chromium's fake camera (a generated test pattern), granted without a prompt
    chromium = _bench().Chromium(flags=("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def page(browser, site):
    p = browser.new_page(site["base"] + "?threads=2")
    ready = p.evaluate("window.mobileinst.ready")
    assert ready["ok"], (ready, p.console)
    return p


def run_page(page, name: str, conf: float | None = CONF) -> dict:
    arg = "" if conf is None else f", {conf}"
    return page.evaluate(f"window.mobileinst.runOnUrl({json.dumps(name)}{arg})")


@pytest.mark.web
def test_page_is_cross_origin_isolated_with_two_threads(page):
    ready = page.evaluate("window.mobileinst.ready")
    assert ready == {"ok": True, "backend": "wasm", "threads": 2, "isolated": True, "notes": []}
    assert page.evaluate("document.getElementById('status').textContent").startswith("ready: WASM, 2 threads")


@pytest.mark.web
def test_page_instances_equal_predict_onnxruntime(page, site, web_dir):
    from mobileinst.infer.factory import load_predictor
    predictor = load_predictor(web_dir / "model.onnx", backend="onnxruntime", conf=CONF)
    total, worst_iou, worst_score = 0, 1.0, 0.0
    for name, img in site["images"].items():
        got = run_page(page, name)
        assert got["ok"], got
        assert (got["height"], got["width"]) == img.shape[:2]
        ref = predictor(img)
        assert len(got["instances"]) == len(ref) > 0, name
        unused = list(range(len(ref)))
        for inst in got["instances"]:  # each page instance: the same class, IoU >= 0.99, close score
            mask = unrle(inst["rle"], got["height"], got["width"])
            best = max(unused, key=lambda j: (ref.labels[j] == inst["label"], mask_iou(mask, ref.masks[j]),
                                              -abs(ref.scores[j] - inst["score"])))
            assert ref.labels[best] == inst["label"], (name, inst["score"])
            assert mask_iou(mask, ref.masks[best]) >= 0.99, (name, inst["score"], mask_iou(mask, ref.masks[best]))
            assert abs(ref.scores[best] - inst["score"]) <= 1e-3, (name, inst["score"], ref.scores[best])
            worst_iou = min(worst_iou, mask_iou(mask, ref.masks[best]))
            worst_score = max(worst_score, abs(float(ref.scores[best]) - inst["score"]))
            unused.remove(best)
        total += len(ref)
    print(f"page == onnxruntime on {len(site['images'])} images, {total} instances: lowest mask IoU "
          f"{worst_iou:.5f}, largest score difference {worst_score:.1e}")


@pytest.mark.web
def test_screenshot_of_the_page_with_masks(page, site):
    page.evaluate("document.getElementById('results').replaceChildren(), window.mobileinst.state.results.length = 0")
    name = next(iter(site["images"]))
    assert run_page(page, name)["ok"]
    drawn = page.evaluate("(() => { const c = document.querySelector('#results canvas'); "
                          "return [c.width, c.height, document.querySelector('.meta').textContent]; })()")
    assert drawn[:2] == [SIZES[0][1], SIZES[0][0]] and "network" in drawn[2] and "instances" in drawn[2]
    path = page.screenshot(ARTEFACTS / "test_web_screenshot.png")
    shot = cv2.imread(str(path))
    assert shot is not None and shot.shape[0] > 100 and shot.std() > 10
    print(f"screenshot: {path}")


@pytest.mark.web
def test_non_image_and_broken_image_are_messages_on_the_page(page):
    got = run_page(page, "notes.txt")
    assert not got["ok"] and got["error"] == "notes.txt: not an image (text/plain, 12 bytes)"
    assert got["shown"] == got["error"]  # the card the page shows
    got = run_page(page, "truncated.png")
    assert not got["ok"] and "truncated.png: not an image this browser can decode" in got["error"]
    assert page.evaluate("document.getElementById('status').className") != "error"  # the page goes on


@pytest.mark.web
def test_huge_image_is_downscaled_before_inference(page):
    got = run_page(page, "huge.png", conf=0.0)
    assert got["ok"], got
    assert (got["width"], got["height"]) == (2048, 2048)
    assert got["note"] == "downscaled from 6000×6000 to 2048×2048 before inference"


@pytest.mark.web
@pytest.mark.parametrize("folder, message", [
    ("no_meta", "model.json: missing (HTTP 404)"),
    ("bad_json", "model.json: not valid JSON"),
    ("bad_field", 'model.json: "format" must be "mobileinst-web", got "x"'),
    ("no_track", 'model.json: "track" must describe the tracking graphs'),
])
def test_missing_or_wrong_metadata_is_a_message_on_the_page(browser, site, folder, message):
    p = browser.new_page(site["base"] + folder + "/")
    ready = p.evaluate("window.mobileinst.ready")
    assert not ready["ok"] and ready["error"].startswith(message), ready
    status = p.evaluate("[document.getElementById('status').textContent, document.getElementById('status').className]")
    assert status == [ready["error"], "error"]
    got = run_page(p, "../image_0_128x128.png")
    assert not got["ok"] and got["error"] == ready["error"]
    browser.send("Target.closeTarget", {"targetId": p.target})


@pytest.mark.web
def test_plain_http_server_falls_back_to_one_thread_and_says_so(browser, site):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server, base = serve_thread(site["root"], Quiet)
    try:
        p = browser.new_page(base + "?threads=2")
        ready = p.evaluate("window.mobileinst.ready")
        assert ready["ok"] and ready["threads"] == 1 and not ready["isolated"]
        status = p.evaluate("document.getElementById('status').textContent")
        assert "1 thread: the page is not cross-origin isolated" in status and "mobileinst serve" in status
        assert run_page(p, next(iter(site["images"])))["ok"]
        browser.send("Target.closeTarget", {"targetId": p.target})
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.web
def test_int8_export_runs_in_the_page_as_in_python(checkpoint, browser, site, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for name in site["images"]:
        shutil.copyfile(site["root"] / name, calib / name)
    out = site["root"] / "int8"
    assert main(["export", "--weights", str(checkpoint), "--format", "web", "--out", str(out),
                 "--conf", str(EXPORT_CONF), "--int8", "--calib", str(calib)]) == 0
    assert json.loads((out / "model.json").read_text())["int8"] is True
    from mobileinst.infer.factory import load_predictor
    predictor = load_predictor(out / "model.onnx", backend="onnxruntime", conf=CONF)
    p = browser.new_page(site["base"] + "int8/?threads=2")
    assert p.evaluate("window.mobileinst.ready")["ok"]
    name, img = next(iter(site["images"].items()))
    got, ref = run_page(p, "../" + name), predictor(img)
    assert got["ok"], got
    # int8 kernels round differently in WASM and on x86 (onnxruntime's U8S8 paths): close scores,
    # not equal ones; compared away from the confidence cut, where an instance may cross it
    page_scores = sorted((i["score"] for i in got["instances"]), reverse=True)
    ref_scores = sorted(ref.scores.tolist(), reverse=True)
    print("int8 page", np.round(page_scores, 4).tolist(), "python", np.round(ref_scores, 4).tolist())
    clear = [s for s in ref_scores if s > CONF + 0.02]
    assert len(clear) > 0 and np.allclose(page_scores[:len(clear)], clear, atol=0.02)
    browser.send("Target.closeTarget", {"targetId": p.target})


@pytest.mark.web
def test_camera_frames_run_through_the_page(browser, site):
    """Chromium's fake camera (a generated test pattern): frames are tracked and drawn on one card."""
    p = browser.new_page(site["base"] + "?threads=1")
    assert p.evaluate("window.mobileinst.ready")["ok"]
    assert p.evaluate("window.mobileinst.camera(true)") == {"ok": True, "frames": 0}
    p.evaluate("new Promise((ok) => { const t = setInterval(() => { if (window.mobileinst.cam.frames >= 3)"
               " { clearInterval(t); ok(); } }, 50); })", timeout=120)
    stopped = p.evaluate("window.mobileinst.camera(false)")
    assert stopped["ok"] and stopped["frames"] >= 3
    cards = p.evaluate("[...document.querySelectorAll('#results .card')].map((c) => c.textContent)")
    assert len(cards) == 1 and cards[0].startswith("camera: ") and "network" in cards[0], cards
    assert " tracks · " in cards[0], cards  # camera frames are tracked
    assert p.evaluate("window.mobileinst.cam.result.instances.every((d) => Number.isInteger(d.id) && d.id > 0)")
    assert p.evaluate("document.getElementById('status').className") != "error"
    browser.send("Target.closeTarget", {"targetId": p.target})


@pytest.mark.web
def test_export_web_writes_the_tracking_graphs(web_dir):
    """track.onnx and track-features.onnx: the graphs `track --backend onnxruntime` runs, at the
    page's input size, as model.json's "track" names them."""
    from mobileinst.export.onnx import graph_kind, read_metadata
    meta = json.loads((web_dir / "model.json").read_text())
    assert meta["format_version"] == 2
    track = meta["track"]
    assert track["outputs"] == {k: k for k in ("logits", "objectness", "kernels", "mask_features")}
    assert (track["reuse"], track["patience"], track["mask_upsample"]) == (1, 10, 2)
    for file, kind in ((track["key"], "raw"), (track["features"], "features")):
        graph = read_metadata(web_dir / file)
        assert graph_kind(graph) == kind
        assert json.loads(graph["input_size"]) == meta["input"]["size"] and graph["input_dtype"] == "uint8"


@pytest.mark.web
def test_page_tracks_equal_python_tracker_on_a_clip(browser, site, web_dir):
    """The clip's frames through the page's camera path (`trackUrls`: onnxruntime-web, video.js,
    tracker.js) and through `VideoPredictor` on the same two graphs in onnxruntime: the same key
    frames, track ids and classes frame by frame, scores within 1e-3, masks IoU >= 0.99."""
    from mobileinst.infer.video import VideoPredictor
    vp = VideoPredictor.from_onnx(web_dir / "track.onnx", web_dir / "track-features.onnx", **TRACKING)
    want = [vp.step(frame) for frame in site["clip"]]
    p = browser.new_page(site["base"] + "?threads=1&" + page_settings(**TRACKING))
    assert p.evaluate("window.mobileinst.ready")["ok"]
    urls = [f"clip/{i:05d}.png" for i in range(len(site["clip"]))]
    got = p.evaluate(f"window.mobileinst.trackUrls({json.dumps(urls)})")
    assert got["ok"], got
    n = assert_same_tracks(got["frames"], want, score_atol=1e-3)
    assert n > 0 and len({i for f in want for i in f.track_ids}) > 1
    caption = p.evaluate("document.querySelector('#results .meta').textContent")
    assert caption.startswith(f"{CLIP_FRAMES - 1:05d}.png: {len(want[-1])} tracks"), caption
    print(f"page == VideoPredictor (onnxruntime) on {len(want)} frames, {n} track-frames")
    browser.send("Target.closeTarget", {"targetId": p.target})


@pytest.mark.web
@pytest.mark.parametrize("src, dst", [((37, 53), (128, 101)), ((90, 100), (115, 128)),
                                      ((300, 400), (96, 128)), ((115, 128), (90, 100))])
def test_page_resize_is_bit_exact_with_cv2(page, src, dst):
    """The page's port of OpenCV's INTER_LINEAR (letterbox and masks) against cv2.resize."""
    img = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    (sh, sw), (dh, dw) = src, dst
    got = page.evaluate(f"Array.from(window.mobileinst.resize(new Uint8Array({json.dumps(img.ravel().tolist())}), "
                        f"{sw}, {sh}, {sw * 3}, 3, 3, {dw}, {dh}))")
    want = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(np.array(got, np.uint8).reshape(dh, dw, 3), want)
