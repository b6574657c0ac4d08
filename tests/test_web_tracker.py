"""The page's tracker (mobileinst/export/web_assets/tracker.js, video.js) against the Python one,
in Node (issue 25: "the tracker's ids equal the Python tracker's on a generated clip").

A MobileInst-TopFormer-T with random weights, edited so that scores spread around the thresholds
(as tests/test_track_onnx.py), tracks a generated clip (`data synth --video`) in Python with
`VideoPredictor` (reuse 2, start 0.5, keep 0.47, patience 2: tracks start, get lost, come back
and end). Its network hands out every key frame's queries in a new random order (a model whose
queries move between slots), so the association has to undo a permutation on every key frame.
What the Python side received is dumped to json and fed to the JavaScript in one Node process
(tests/web_tracker.js):

- the assignment: SciPy's `linear_sum_assignment` against its port, on random and tie-heavy costs;
- the tracker: exactly the inputs Python's `Tracker` got (key-frame kernels, then per-slot class
  probabilities and maskness) -> the same permutation on every key frame and the same alive
  tracks (id, slot, class, score) after every frame;
- the stream: the raw network outputs of every frame (what the page gets from onnxruntime-web)
  -> the same key frames, track ids and classes per frame, scores within 1e-5, masks IoU >= 0.99.

Needs `node` (Node.js >= 18) on PATH, else skipped; in the default suite (a few seconds) and in
`make test-web`, whose tests/test_web.py also runs the page's own tracking path in Chromium.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mobileinst import build_model
from mobileinst.data.synthetic_video import make_synthetic_ytvis
from mobileinst.infer.preprocess import preprocess, prepare
from mobileinst.infer.video import RAW_KEYS, TorchVideoNet, VideoPredictor
from mobileinst.infer.tracker import Tracker
from mobileinst.track.video_io import open_frames

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
DRIVER = ROOT / "tests" / "web_tracker.js"
IMGSZ = 128
CLIP_LENGTH = 16
TRACKING = {"reuse": 2, "conf": 0.5, "keep_conf": 0.47, "patience": 2}  # VideoPredictor's options
SCORE_ATOL = 1e-5  # the stream's scores: float32 in PyTorch, float64 sums in JavaScript


# -- helpers, also for tests/test_web.py -----------------------------------------------------------
class Bag(dict):
    """A dict with a short repr (a failing test prints its arguments: these hold megabytes)."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


def clip_frames(folder: Path, length: int = CLIP_LENGTH) -> list[np.ndarray]:
    """The RGB frames of one generated clip (`make_synthetic_ytvis`, seed 0), written under folder."""
    make_synthetic_ytvis(folder, n_train=0, n_val=1, length=length)
    frames = open_frames(folder / "val" / "JPEGImages" / "val_0000")
    try:
        return [image for _, image in frames]
    finally:
        frames.close()


def page_settings(reuse: int, conf: float, keep_conf: float, patience: int) -> str:
    """TRACKING as the page's URL parameters."""
    return f"reuse={reuse}&conf={conf}&keep={keep_conf}&patience={patience}"


def unrle(counts: list[int], h: int, w: int) -> np.ndarray:
    """The page's row-major run lengths (first run: 0s) -> (h, w) bool."""
    flat = np.zeros(h * w, bool)
    ends = np.cumsum(counts)
    for i in range(1, len(counts), 2):
        flat[ends[i - 1]:ends[i]] = True
    return flat.reshape(h, w)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_same_tracks(js_frames: list[dict], py_frames: list, score_atol: float) -> int:
    """Frame by frame: key frame, track ids (slot order), classes, scores, masks (IoU >= 0.99).
    Returns the number of track-frames compared."""
    assert len(js_frames) == len(py_frames)
    n = 0
    for i, (js, py) in enumerate(zip(js_frames, py_frames)):
        assert js["key"] == py.key, i
        assert [t["id"] for t in js["tracks"]] == py.track_ids.tolist(), f"frame {i}: track ids differ"
        assert [t["label"] for t in js["tracks"]] == py.labels.tolist(), i
        np.testing.assert_allclose([t["score"] for t in js["tracks"]], py.scores, atol=score_atol, rtol=0)
        for t, mask in zip(js["tracks"], py.masks):
            assert mask_iou(unrle(t["rle"], *mask.shape), mask) >= 0.99, (i, t["id"])
        n += len(py)
    return n


# -- the Python run, recorded ------------------------------------------------------------------------
def tracking_model(first_frame: np.ndarray) -> torch.nn.Module:
    """Random weights edited so that masks cover parts of the frame and scores spread."""
    torch.manual_seed(0)
    m = build_model("mobileinst-topformer-t", num_classes=4).eval()
    x, _ = preprocess([first_frame], IMGSZ, 171)
    with torch.no_grad():
        m.mask_decoder.mask_proj.bias.sub_(m.features(x)[0].mean((0, 2, 3)))
        raw = m.forward_raw(x)
        m.instance_decoder.kernel_head.weight.mul_(4.0 / raw["pred_masks"].std())
        m.instance_decoder.class_head.weight.mul_(2.0 / raw["pred_logits"].std())
        m.instance_decoder.class_head.bias.fill_(-2.0)
    return m


class ShuffledNet:
    """A VideoNet over `net` that hands out each key frame's queries in a new random order and
    records every frame's outputs (what the page's stream is fed)."""

    def __init__(self, net: TorchVideoNet, seed: int = 0) -> None:
        self.net, self.info, self.backend = net, net.info, net.backend
        self.rng = np.random.default_rng(seed)
        self.outputs: list[dict[str, torch.Tensor]] = []

    def key(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, obj, kernels, feats = self.net.key(batch)
        order = torch.from_numpy(self.rng.permutation(logits.shape[1]))
        out = (logits[:, order], obj[:, order], kernels[:, order], feats)
        self.outputs.append(dict(zip(RAW_KEYS, out)))
        return out

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        feats = self.net.features(batch)
        self.outputs.append({"mask_features": feats})
        return feats


@dataclass
class RecordingTracker(Tracker):
    """The Python tracker, recording what it receives on each key frame (and its permutation)."""

    calls: dict[int, dict] = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    def associate(self, kernels: torch.Tensor) -> np.ndarray:
        perm = super().associate(kernels)
        self.pending = {"kernels": kernels.numpy().copy(), "perm": perm}
        return perm

    def update(self, frame: int, class_probs: np.ndarray, maskness: np.ndarray):
        self.calls[frame] = {**self.pending, "class_probs": class_probs.copy(), "maskness": maskness.copy()}
        return super().update(frame, class_probs, maskness)


@pytest.fixture(scope="module")
def python_run(tmp_path_factory) -> dict:
    frames = clip_frames(tmp_path_factory.mktemp("clip"))
    net = ShuffledNet(TorchVideoNet(tracking_model(frames[0])))
    vp = VideoPredictor(net, imgsz=IMGSZ, **TRACKING)
    vp.tracker = RecordingTracker(vp.tracker.cfg)
    vp.reset()
    tracked, alive, geoms = [], [], []
    for image in frames:
        batch, sizes = prepare([image], vp.info.input, vp.imgsz, vp.max_size)
        geoms.append({"padded": list(batch.shape[-2:]), "size": list(sizes[0]), "orig": list(image.shape[:2])})
        out = vp.step(image)
        tracked.append(out)
        alive.append([(t.id, t.slot, t.label, t.score) for t in out.tracks])  # the tracks change later
    return Bag(tracked=tracked, alive=alive, calls=vp.tracker.calls, outputs=net.outputs, geoms=geoms,
               mask_upsample=vp.info.mask_upsample, mask_threshold=vp.mask_threshold)


# -- the dump and the Node run ---------------------------------------------------------------------
def floats(a) -> list[float]:
    return np.asarray(a, np.float32).ravel().tolist()


def assignment_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """(cost, SciPy's col_ind): random, integer (many equal costs), constant, rectangular."""
    g = np.random.default_rng(0)
    costs = [g.random((n, n)) for n in (1, 2, 7, 100)]
    costs += [g.integers(0, 3, (n, n)).astype(float) for n in (5, 20, 60)]
    costs += [np.ones((6, 6)), g.random((30, 50)), g.integers(0, 2, (8, 12)).astype(float)]
    return [(c, linear_sum_assignment(c)[1]) for c in costs]


def tracker_dump(run: dict) -> dict:
    frames = []
    for i in range(len(run["tracked"])):
        call = run["calls"].get(i)
        if call is None:
            frames.append({"key": False})
            continue
        (n, e), c = call["kernels"].shape, call["class_probs"].shape[1]
        frames.append({"key": True, "frame": i, "n": n, "e": e, "c": c, "kernels": floats(call["kernels"]),
                       "class_probs": floats(call["class_probs"]), "maskness": floats(call["maskness"])})
    return {"cfg": {"startScore": TRACKING["conf"], "keepScore": TRACKING["keep_conf"],
                    "patience": TRACKING["patience"]}, "frames": frames}


def video_dump(run: dict) -> dict:
    tensor = lambda t: {"data": floats(t), "dims": list(t.shape)}  # noqa: E731
    frames = [{**{k: tensor(v) for k, v in out.items()}, "geom": geom}
              for out, geom in zip(run["outputs"], run["geoms"])]
    opts = {"maskUpsample": run["mask_upsample"], "maskThreshold": run["mask_threshold"],
            "reuse": TRACKING["reuse"], "startScore": TRACKING["conf"], "keepScore": TRACKING["keep_conf"],
            "patience": TRACKING["patience"]}
    return {"opts": opts, "frames": frames}


def run_node(dump: dict, folder: Path) -> dict:
    src, dst = folder / "in.json", folder / "out.json"
    src.write_text(json.dumps(dump))
    done = subprocess.run([NODE, str(DRIVER), str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return Bag(json.loads(dst.read_text()))


@pytest.fixture(scope="module")
def js(python_run, tmp_path_factory) -> dict:
    if NODE is None:
        pytest.skip("needs node (Node.js >= 18) on PATH")
    dump = {"assignment": [{"rows": c.shape[0], "cols": c.shape[1], "cost": c.ravel().tolist()}
                           for c, _ in assignment_cases()],
            "tracker": tracker_dump(python_run), "video": video_dump(python_run)}
    return run_node(dump, tmp_path_factory.mktemp("node"))


# -- the tests -------------------------------------------------------------------------------------
def test_assignment_equals_scipy_including_ties(js):
    cases = assignment_cases()
    assert len(js["assignment"]) == len(cases)
    for (cost, want), got in zip(cases, js["assignment"]):
        assert got == want.tolist(), cost.shape


def test_tracker_ids_equal_python_tracker_frame_by_frame(js, python_run):
    frames = js["tracker"]
    assert len(frames) == len(python_run["alive"])
    for i, (got, want) in enumerate(zip(frames, python_run["alive"])):
        call = python_run["calls"].get(i)
        assert got["key"] == (call is not None), i
        if call is not None:
            assert got["perm"] == call["perm"].tolist(), f"frame {i}: association differs"
        got_tracks = sorted((t["id"], t["slot"], t["label"], t["score"]) for t in got["alive"])
        assert got_tracks == sorted(want), f"frame {i}: tracks differ"


def test_stream_equals_video_predictor_frame_by_frame(js, python_run):
    n = assert_same_tracks(js["video"], python_run["tracked"], SCORE_ATOL)
    assert n > 0


def test_the_clip_exercises_the_tracker(python_run):
    """What the parity above covers: non-key frames, a permutation to undo on every key frame, and
    tracks that start after frame 0, get lost and come back, and end."""
    alive = [{t[0] for t in frame} for frame in python_run["alive"]]
    ids = set().union(*alive)
    keys = [f.key for f in python_run["tracked"]]
    assert 0 < keys.count(True) < len(keys)
    perms = [c["perm"] for i, c in sorted(python_run["calls"].items()) if i > 0]
    assert perms and all((p != np.arange(len(p))).any() for p in perms)
    assert len(ids) > len(alive[0]) > 0, "tracks start after the first frame"
    seen_later = lambda i, t: any(i in s for s in alive[t + 1:])  # noqa: E731
    assert any(i in alive[t - 1] and i not in alive[t] and seen_later(i, t)
               for i in ids for t in range(1, len(alive) - 1)), "a lost track comes back"
    assert any(i in alive[0] and not any(i in s for s in alive[-3:]) for i in ids), "tracks end"
