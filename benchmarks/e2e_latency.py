"""End-to-end CPU latency per image, MobileInst vs YOLO-seg, trained checkpoints, onnxruntime.

    make bench-peers
    .venv/bin/python benchmarks/e2e_latency.py \
        --weights runs/learning_curve/mobileinst-mnv2-imagenet/weights/budget-10min.pt \
                  runs/learning_curve/mobileinst-topformer-t-scratch/weights/budget-10min.pt \
        --yolo runs/learning_curve/yolo26n-seg/budget-10min.pt runs/learning_curve/yolo11n-seg/budget-10min.pt
    .venv/bin/python benchmarks/e2e_latency.py --weights W.pt --yolo yolo26n-seg.yaml   # random YOLO
    .venv/bin/python benchmarks/e2e_latency.py --weights W.pt --profile-post            # + where post goes

End to end = from an RGB uint8 image in memory to instances with masks at the original image
size: pre-processing + network + post-processing, batch 1, one image at a time, on the val
images of --data (default: the hard synthetic set of benchmarks/learning_curve.py).

- MobileInst: `load_predictor(onnx, backend="onnxruntime", threads=T, conf=C)` (an
  `OnnxPredictor`), timed per stage as its `_predict` runs them: prepare (letterbox into the
  graph's input), forward (the cast to uint8, the input check, one onnxruntime run),
  postprocess (`decode_instances` at conf: scores, masks of the kept queries only, each made
  inside its box at the original size; and the Result's numpy arrays). The graph at each --imgsz S
  is the fixed SxS raw-output uint8 graph of
  `mobileinst export --weights W --imgsz S` (the image letterboxed into SxS: YOLO's input too);
  at the training size also `native`: the dynamic float32 graph `load_predictor(W.pt,
  backend="onnxruntime")` exports, fed as in training (short side S, long side <= S*853/640,
  padded to /32).
- YOLO: the checkpoint exported by ultralytics' own exporter (`YOLO(pt).export(format="onnx",
  imgsz=S)`, fixed SxS, onnxslim), loaded with `YOLO("x.onnx")`, and timed as
  `predict(image, imgsz=S, conf=C, retina_masks=True, max_det=100)`: retina_masks makes it
  return masks at the original image size, as MobileInst does. Its input is a BGR array (its
  convention for numpy images): the RGB->BGR copy is inside the wall clock. pre/net/post are its
  own `Results.speed` (preprocess/inference/postprocess); e2e is our wall clock around the whole
  predict() call (it includes what `speed` does not: the source loader, Results objects).
- Threads: every (S, T) is one fresh process with OMP_NUM_THREADS=T, torch.set_num_threads(T),
  1 inter-op thread; onnxruntime sessions get intra_op_num_threads=T, inter_op 1, sequential,
  no spinning (`mobileinst.infer.ort.session_options`); ultralytics' own session is created with
  the same options (its loader passes none, which would use every core); glibc keeps freed memory
  (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_).
- The models run interleaved in that process, image after image (the order rotated per image),
  so they see the same machine state. --warmup calls on other val images first, then --runs
  timed images: median and p90 per stage and end to end, and the mean instance count per image.
- GFLOP/s = the network's GFLOPs (torch.utils.flop_counter, 2 per MAC: `mobileinst info` for
  MobileInst, the fused PyTorch model for YOLO) / the median network time; "% peak" = that over
  this core's fp32 peak measured in onnxruntime itself, in the same process: a --gemm cubed
  MatMul graph (B a constant initializer), 2*M*N*K / median time, before and after the timing.

Output: a markdown table on stdout and runs/e2e_latency/e2e_latency.json (machine, versions,
load averages, every per-image time). --profile-post adds MobileInst's decode at 640 on 1 thread
two ways, the package's and the plain recipe's (every kept mask upsampled whole; `profile_post`),
with the smallest mask IoU between them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mobileinst.infer.factory import _cache_valid as cache_valid  # noqa: E402 - after the path
from mobileinst.infer.factory import load_predictor, load_trained  # noqa: E402
from mobileinst.infer.ort import session_options  # noqa: E402
from mobileinst.utils import file_sha256 as sha256  # noqa: E402

DEFAULT_DATA = "runs/learning_curve/hard-400-100/data.yaml"
OUT = "runs/e2e_latency"


# -- small helpers -------------------------------------------------------------------------------
def tag(path: str | Path) -> str:
    """runs/x/<model>/weights/budget-10min.pt -> x/<model>/budget-10min (the last three path parts
    but `runs` and `weights`, so runs/a/train/weights/best.pt and runs/b/train/... differ);
    yolo26n-seg.yaml -> itself."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        return p.stem + " (random)"
    parts = [x for x in p.with_suffix("").parts if x not in ("runs", "weights", ".", "..", "/")]
    return "/".join(parts[-3:])


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def pct(values: list[float], q: float) -> float:
    import numpy as np
    return float(np.percentile(values, q)) if values else float("nan")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnxruntime", "onnx", "onnxslim", "ultralytics", "numpy", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
        flags = next(x.split(":", 1)[1] for x in lines if x.startswith("flags"))
    except (OSError, StopIteration):
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags.split()]
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count() or 0, "code": code_version(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_start": loadavg(), "versions": versions(),
            "utc_start": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def code_version() -> str:
    """The mobileinst code timed: the checkout's commit (+ how many files under mobileinst/ differ
    from it), or a snapshot's recorded commit (ROOT/SNAPSHOT, written by whoever made it)."""
    snap = ROOT / "SNAPSHOT"
    if snap.is_file():
        return f"snapshot of {snap.read_text().strip()} (git archive)"
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "mobileinst"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        return head + (f" + {len(dirty)} changed files under mobileinst/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def val_images(data: str | Path, n: int) -> list[str]:
    """The first n val image paths of a COCO-format DATA yaml (cycled when it has fewer)."""
    from mobileinst.data.config import load_data_config
    cfg = load_data_config(data)
    files = [str(cfg.val.images / im["file_name"]) for im in
             sorted(json.loads(cfg.val.json.read_text())["images"], key=lambda im: im["id"])]
    if not files:
        sys.exit(f"{data}: no val images")
    return [files[i % len(files)] for i in range(n)]


# -- onnxruntime peak: a big MatMul ------------------------------------------------------------
def gemm_session(n: int, threads: int):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])
    return sess, {"A": rng.standard_normal((n, n), dtype=np.float32)}


def gemm_gflops(sess, feed, n: int, warmup: int = 3, runs: int = 10) -> dict:
    for _ in range(warmup):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(ts) * 1000, "gflops": 2 * n ** 3 / statistics.median(ts) / 1e9,
            "best_gflops": 2 * n ** 3 / min(ts) / 1e9}


# -- exports (parent process, before any timing) -------------------------------------------------
def export_mobileinst(weights: str, imgsz: int, folder: Path, native: bool = False) -> Path:
    """The fixed imgsz x imgsz uint8 raw graph (`mobileinst export --weights W --imgsz S`), or with
    native the dynamic float32 one `load_predictor(W.pt, backend="onnxruntime")` caches; kept in
    folder (re-exported when the checkpoint changes)."""
    from mobileinst.export.onnx import export_onnx
    sha = sha256(weights)
    out = folder / f"{slug(tag(weights))}-{'native' if native else imgsz}.onnx"
    if cache_valid(out, sha):
        return out
    model, info = load_trained(weights)
    kw = {"class_names": list(info.class_names), "cat_ids": list(info.cat_ids),
          "metadata": {"source": Path(weights).name, "source_sha256": sha}}
    if native:  # as cached_onnx exports it (traced at >= 256 px)
        side = max(imgsz, 256)
        return export_onnx(model, out, imgsz=(side, side), dynamic=True, input_dtype="float32",
                           default_imgsz=imgsz, **kw)
    return export_onnx(model, out, imgsz=(imgsz, imgsz), **kw)


def export_yolo(weights: str, imgsz: int, folder: Path) -> Path:
    """ultralytics' own ONNX export of a checkpoint (or a YAML: random weights) at imgsz x imgsz,
    in a child process run in folder (the exporter writes beside its source)."""
    src = Path(weights)
    key = sha256(src)[:12] if src.suffix == ".pt" else src.stem
    out = folder / f"{slug(tag(weights))}-{key}-{imgsz}.onnx"
    if out.is_file():
        return out
    work = folder / f"export-{slug(tag(weights))}-{imgsz}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if src.suffix == ".pt":
        shutil.copyfile(src, work / "model.pt")
        source = "model.pt"
    else:
        source = str(src)  # a YAML name ultralytics resolves from its package
    code = ("import sys; sys.path[:0] = [%r, %r]\nimport yolo_peer\nfrom pathlib import Path\n"
            "yolo_peer.prepare_ultralytics(2, Path('settings').resolve())\n"
            "from ultralytics import YOLO\n"
            "print(YOLO(%r).export(format='onnx', imgsz=%d, simplify=True, dynamic=False, "
            "device='cpu', verbose=False))" % (str(ROOT), str(Path(__file__).parent), source, imgsz))
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"YOLO export of {weights} failed: "
                           + " | ".join((proc.stderr.strip().splitlines() or ["?"])[-3:])[:600])
    made = Path(proc.stdout.strip().splitlines()[-1].strip())  # relative to the child's cwd
    shutil.move(str(made if made.is_absolute() else work / made), out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def mobileinst_gflops(weights: str, hw: tuple[int, int], cache: dict) -> float:
    key = (weights, tuple(hw))
    if key not in cache:
        from mobileinst.profile import count_flops
        model, _ = load_trained(weights)
        cache[key] = count_flops(model, tuple(hw))["total"] / 1e9
    return cache[key]


def yolo_gflops(weights: str, imgsz: int) -> float:
    """FLOPs of the fused PyTorch model at 1x3xSxS (a child process: ultralytics imports)."""
    code = ("import sys; sys.path[:0] = [%r, %r]\nimport yolo_peer, torch, tempfile\nfrom pathlib import Path\n"
            "yolo_peer.prepare_ultralytics(2, Path(tempfile.mkdtemp()))\n"
            "from ultralytics import YOLO\nfrom torch.utils.flop_counter import FlopCounterMode\n"
            "net = YOLO(%r).model.float().eval()\nnet = net.fuse(verbose=False) if hasattr(net, 'fuse') else net\n"
            "with FlopCounterMode(display=False) as c, torch.no_grad():\n"
            "    net(torch.zeros(1, 3, %d, %d))\nprint(c.get_total_flops() / 1e9)"
            % (str(ROOT), str(Path(__file__).parent), weights, imgsz, imgsz))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        print(f"[{tag(weights)}] FLOPs not counted: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}",
              file=sys.stderr)
        return float("nan")
    return float(proc.stdout.strip().splitlines()[-1])


# -- the timed process ---------------------------------------------------------------------------
@contextlib.contextmanager
def pinned_ort_sessions(threads: int):
    """Sessions onnxruntime creates without options (ultralytics' loader) get `threads`."""
    import onnxruntime as ort
    real = ort.InferenceSession

    def make(path_or_bytes, sess_options=None, *args, **kwargs):
        return real(path_or_bytes, sess_options or session_options(threads), *args, **kwargs)
    ort.InferenceSession = make
    try:
        yield
    finally:
        ort.InferenceSession = real


class MobileInstTimer:
    def __init__(self, spec: dict, threads: int, conf: float) -> None:
        self.spec = spec
        self.p = load_predictor(spec["onnx"], backend="onnxruntime", threads=threads, conf=conf)
        so = self.p.session.get_session_options()
        self.session_threads = (so.intra_op_num_threads, so.inter_op_num_threads)

    def __call__(self, image) -> dict:
        """One image through the predictor's own stages, batch 1: prepare (resize, pad, the graph's
        dtype), run (onnxruntime), decode (masks at the original size, the Result's arrays)."""
        import torch
        p = self.p
        with torch.no_grad():
            t0 = time.perf_counter()
            batch, sizes = p.prepare([image])
            t1 = time.perf_counter()
            out = p.forward(batch)  # the cast to the graph's dtype, the input check, one run
            t2 = time.perf_counter()
            res = p.postprocess(out, tuple(batch.shape[-2:]), sizes, [image.shape[:2]])[0]
            t3 = time.perf_counter()
        self.last = res
        return {"pre": (t1 - t0) * 1e3, "net": (t2 - t1) * 1e3, "post": (t3 - t2) * 1e3,
                "e2e": (t3 - t0) * 1e3, "n": len(res), "input": list(batch.shape[-2:]),
                "mask_hw": list(res.masks.shape[1:]) if len(res) else None}

    def scores(self, image) -> list[float]:
        """Every instance's final score at a near-zero conf (for --match-instances)."""
        saved, self.p.conf = self.p.conf, 0.001
        try:
            return [float(x) for x in self.p(image).scores]
        finally:
            self.p.conf = saved

    def set_conf(self, conf: float) -> None:
        self.p.conf = conf

    def check(self, image) -> bool:
        """The staged call gives what the predictor's own __call__ gives."""
        import numpy as np
        self(image)
        ref = self.p(image)
        a = self.last
        return bool(len(a) == len(ref) and np.array_equal(a.labels, ref.labels)
                    and np.allclose(a.scores, ref.scores) and np.array_equal(a.masks, ref.masks))


class YoloTimer:
    def __init__(self, spec: dict, threads: int, conf: float) -> None:
        from ultralytics import YOLO
        self.spec, self.conf = spec, conf
        with pinned_ort_sessions(threads):
            self.model = YOLO(spec["onnx"], task="segment")
            self(self._dummy())  # builds the predictor and its onnxruntime session here
        so = self.model.predictor.model.backend.session.get_session_options() \
            if hasattr(self.model.predictor.model, "backend") else None
        self.session_threads = (so.intra_op_num_threads, so.inter_op_num_threads) if so else None

    def scores(self, image) -> list[float]:
        import cv2
        r = self.model.predict(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), imgsz=self.spec["imgsz"], conf=1e-4,
                               retina_masks=True, max_det=100, device="cpu", verbose=False)[0]
        return [float(x) for x in r.boxes.conf]

    def set_conf(self, conf: float) -> None:
        self.conf = conf

    @staticmethod
    def _dummy():
        import numpy as np
        return np.full((320, 416, 3), 114, np.uint8)

    def __call__(self, image) -> dict:
        import cv2
        t0 = time.perf_counter()
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # ultralytics' numpy images are BGR
        r = self.model.predict(bgr, imgsz=self.spec["imgsz"], conf=self.conf, retina_masks=True,
                               max_det=100, device="cpu", verbose=False)[0]
        t1 = time.perf_counter()
        n = 0 if r.masks is None else len(r.masks.data)
        return {"pre": r.speed["preprocess"], "net": r.speed["inference"], "post": r.speed["postprocess"],
                "e2e": (t1 - t0) * 1e3, "n": n, "input": [self.spec["imgsz"]] * 2,
                "mask_hw": list(r.masks.data.shape[1:]) if n else None}


def session_threads_of(timer):
    return getattr(timer, "session_threads", None)


def worker(cfg: dict) -> dict:
    import cv2
    import torch
    torch.set_num_threads(cfg["threads"])
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    threads = cfg["threads"]
    res = {"loadavg_start": loadavg(), "threads": threads, "imgsz": cfg["imgsz"]}
    gsess, gfeed = gemm_session(cfg["gemm"], threads)
    res["gemm_before"] = gemm_gflops(gsess, gfeed, cfg["gemm"])
    timers = []
    if any(s["kind"] == "yolo" for s in cfg["models"]):
        import yolo_peer
        yolo_peer.prepare_ultralytics(threads, Path(cfg["settings"]))
    for spec in cfg["models"]:
        timers.append((MobileInstTimer if spec["kind"] == "mobileinst" else YoloTimer)(spec, threads, cfg["conf"]))
    torch.set_num_threads(threads)  # ultralytics' select_device sets it too: keep ours
    res["torch_threads"] = torch.get_num_threads()
    res["session_threads"] = {s["name"]: session_threads_of(t) for s, t in zip(cfg["models"], timers)}
    images = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in cfg["images"]]
    warm, timed = images[:cfg["warmup"]], images[cfg["warmup"]:]
    res["staged_equals_call"] = {s["name"]: t.check(warm[0]) for s, t in zip(cfg["models"], timers)
                                 if s["kind"] == "mobileinst"}
    res["conf"] = {s["name"]: cfg["conf"] for s in cfg["models"]}
    if cfg.get("match_instances"):  # each model's conf: about K instances per warm-up image
        k = cfg["match_instances"]
        for spec, t in zip(cfg["models"], timers):
            sc = sorted((x for im in warm for x in t.scores(im)), reverse=True)
            want = round(k * len(warm))
            conf = sc[want - 1] - 1e-7 if len(sc) >= want else (sc[-1] - 1e-7 if sc else 1e-4)
            conf = max(conf, 1e-4)
            t.set_conf(conf)
            res["conf"][spec["name"]] = conf
    for im in warm:
        for t in timers:
            t(im)
    per = {s["name"]: [] for s in cfg["models"]}
    for i, im in enumerate(timed):
        order = list(range(len(timers)))
        order = order[i % len(order):] + order[:i % len(order)]
        for k in order:
            r = timers[k](im)
            r["image_hw"] = list(im.shape[:2])
            if r["mask_hw"] is not None and r["mask_hw"] != r["image_hw"]:
                raise RuntimeError(f"{cfg['models'][k]['name']}: masks {r['mask_hw']} are not at the image size")
            per[cfg["models"][k]["name"]].append(r)
    res["gemm_after"] = gemm_gflops(gsess, gfeed, cfg["gemm"])
    res["per_image"] = per
    res["loadavg_end"] = loadavg()
    if cfg.get("profile_post"):
        res["profile_post"] = profile_post(timers, cfg["models"], timed, cfg.get("profile_conf"))
    return res


def spawn(cfg: dict) -> dict:
    t = str(cfg["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
           "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736",
           "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    job = Path(cfg["out"]) / f"job-{cfg['imgsz']}-{cfg['threads']}.json"
    job.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(job)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {cfg['imgsz']}/{cfg['threads']}T failed: "
                           + " | ".join((proc.stderr.strip().splitlines() or ["?"])[-4:])[:800])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- what MobileInst's post-processing costs ------------------------------------------------------
def plain_binary_masks(prob, padded, size, orig, threshold):
    """The recipe as written: every kept mask upsampled whole (`upsample_masks`) and thresholded."""
    from mobileinst.models.postprocess import upsample_masks
    return upsample_masks(prob, padded, size, orig) > threshold


def profile_post(timers, specs, images, conf: float | None = None, reps: int = 5) -> dict:
    """MobileInst's decode of the same raw outputs two ways, on the timed images with an instance:
    the package's (`decode_instances`: masks only inside each kept instance's box) and the plain
    recipe (every kept mask upsampled whole to the padded input, cropped, resized to the image);
    median ms of each and the smallest per-instance mask IoU between them."""
    import numpy as np
    import torch

    from mobileinst.infer.predictor import RAW_KEYS
    from mobileinst.models import postprocess as pp
    report = {}
    for spec, t in zip(specs, timers):
        if spec["kind"] != "mobileinst":
            continue
        p = t.p
        cfg = pp.conf_config(p.info.inference, p.conf if conf is None else conf)
        cases = []
        for im in images:
            batch, sizes = p.prepare([im])
            out = p.forward(batch)
            raw = [torch.as_tensor(out[k][0]) for k in RAW_KEYS]
            cases.append((raw, tuple(batch.shape[-2:]), tuple(sizes[0]), im.shape[:2]))
        times: dict[str, list[float]] = {"package": [], "plain recipe": []}
        ious, counts = [], []
        real = pp.binary_masks
        for rep in range(reps):
            for raw, padded, size, orig in cases:
                decoded = {}
                for name, fn in (("package", real), ("plain recipe", plain_binary_masks)):
                    pp.binary_masks = fn  # postprocess_image looks it up at each call
                    try:
                        t0 = time.perf_counter()
                        decoded[name] = pp.decode_instances(*raw, padded, size, orig, cfg, p.info.mask_upsample)
                        times[name].append((time.perf_counter() - t0) * 1e3)
                    finally:
                        pp.binary_masks = real
                if rep == 0:
                    a, b = decoded["package"]["masks"], decoded["plain recipe"]["masks"]
                    counts.append(len(a))
                    for x, y in zip(a, b):
                        union = int((x | y).sum())
                        ious.append(1.0 if union == 0 else int((x & y).sum()) / union)
        report[spec["name"]] = {
            "images": len(cases), "conf": cfg.conf, "input": list(cases[0][1]) if cases else None,
            "instances_mean": float(np.mean(counts)) if counts else 0.0,
            "median_ms": {k: statistics.median(v) for k, v in times.items() if v},
            "min_mask_iou": min(ious) if ious else None}
    return report


# -- the report ----------------------------------------------------------------------------------
def summarize(name: str, rows: list[dict], gflops: float, peak: float) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in ("pre", "net", "post", "e2e")}
    p90 = {k: pct([r[k] for r in rows], 90) for k in ("pre", "net", "post", "e2e")}
    achieved = gflops / (med["net"] / 1e3) if gflops == gflops else float("nan")
    return {"model": name, "images": len(rows), "instances_mean": statistics.mean(r["n"] for r in rows),
            "median_ms": med, "p90_ms": p90, "gflops": gflops, "gflops_per_s": achieved,
            "peak_gflops_per_s": peak, "fraction_of_peak": achieved / peak}


def fmt_row(s: dict, label: str, threads: int) -> str:
    m, p = s["median_ms"], s["p90_ms"]
    cells = [s["model"], label, threads, f"{s['conf']:.3g}", f"{s['instances_mean']:.2f}",
             f"{m['pre']:.1f}", f"{m['net']:.1f}",
             f"{m['post']:.1f}", f"**{m['e2e']:.1f}**", f"{p['e2e']:.1f}", f"{s['gflops']:.2f}",
             f"{s['gflops_per_s']:.0f}", f"{s['peak_gflops_per_s']:.0f}", f"{100 * s['fraction_of_peak']:.0f}%"]
    return "| " + " | ".join(map(str, cells)) + " |"


HEADER = ["model", "input", "thr", "conf", "inst/img", "pre ms", "net ms", "post ms", "e2e ms", "e2e p90",
          "GFLOPs", "GFLOP/s", "ORT peak", "% peak"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", default=[], help="MobileInst .pt checkpoints")
    ap.add_argument("--yolo", nargs="+", default=[], help="YOLO-seg .pt checkpoints (or a YAML: random weights)")
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"DATA yaml (default {DEFAULT_DATA})")
    ap.add_argument("--imgsz", type=int, nargs="+", default=None,
                    help="square input sizes (default: 640 and the checkpoints' training size)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=40, help="timed images per configuration (default 40)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--conf", type=float, default=0.25, help="confidence, both models (default 0.25)")
    ap.add_argument("--match-instances", type=float, default=None, metavar="K",
                    help="instead of one --conf: each model's conf set (on the warm-up images) to return "
                         "about K instances per image, so that every model's post-processing has masks to make")
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=True,
                    help="at the training size, also MobileInst's own dynamic graph (short side S)")
    ap.add_argument("--gemm", type=int, default=2048, help="M=N=K of the onnxruntime peak MatMul")
    ap.add_argument("--profile-post", action="store_true",
                    help="also: where MobileInst's decode time goes at 640 on 1 thread")
    ap.add_argument("--profile-conf", type=float, default=None,
                    help="conf for --profile-post (default --conf; lower it for more instances per image)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    if args.yolo:
        from latency import peers_available
        if not peers_available():
            sys.exit("ultralytics is not installed: run `make bench-peers`")
    if not args.weights and not args.yolo:
        sys.exit("nothing to time: give --weights and/or --yolo")
    for w in args.weights + [y for y in args.yolo if y.endswith(".pt")]:
        if not Path(w).is_file():
            sys.exit(f"{w}: no such checkpoint")
    out = Path(args.out)
    exports = out / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    info = machine()
    print("machine: " + f"{info['cpu']} ({', '.join(info['simd'])}), {info['cores']} cores, "
          f"load {info['loadavg_start']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
          flush=True)

    import torch
    if any(y.endswith(".pt") for y in args.yolo):  # unpickling a YOLO checkpoint imports ultralytics
        import yolo_peer
        yolo_peer.prepare_ultralytics(max(args.threads), (out / "ultralytics-settings").resolve())
    train_sizes = set()
    for w in args.weights:
        train_sizes.add(int((torch.load(w, map_location="cpu", weights_only=False).get("train_config")
                             or {}).get("imgsz", 640)))
    for y in args.yolo:
        if y.endswith(".pt"):
            train_sizes.add(int(torch.load(y, map_location="cpu", weights_only=False)
                                .get("train_args", {}).get("imgsz", 640)))
    sizes = args.imgsz or sorted({640, *train_sizes}, reverse=True)
    mi_train = {w: int((torch.load(w, map_location="cpu", weights_only=False).get("train_config") or {})
                       .get("imgsz", 640)) for w in args.weights}
    images = val_images(args.data, args.warmup + args.runs)

    # exports and FLOPs, all before any timing
    flop_cache: dict = {}
    configs = []
    for s in sizes:
        models = []
        for w in args.weights:
            models.append({"kind": "mobileinst", "name": tag(w), "weights": w, "imgsz": s, "label": f"{s}x{s}",
                           "onnx": str(export_mobileinst(w, s, exports))})
            if args.native and s == mi_train[w]:
                models.append({"kind": "mobileinst", "name": tag(w) + " native", "weights": w, "imgsz": s,
                               "label": f"short {s} (native)",
                               "onnx": str(export_mobileinst(w, s, exports, native=True))})
        for y in args.yolo:
            models.append({"kind": "yolo", "name": tag(y), "weights": y, "imgsz": s, "label": f"{s}x{s}",
                           "onnx": str(export_yolo(y, s, exports)), "gflops": yolo_gflops(y, s)})
        for m in models:
            print(f"exported {m['name']} @ {m['label']}: {m['onnx']}", flush=True)
        configs.append((s, models))

    results, lines = [], ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    ratios = []
    for s, models in configs:
        for t in args.threads:
            cfg = {"imgsz": s, "threads": t, "models": models, "images": images, "warmup": args.warmup,
                   "conf": args.conf, "gemm": args.gemm, "out": str(out),
                   "settings": str((out / "ultralytics-settings").resolve()),
                   "profile_post": args.profile_post and s == 640 and t == 1, "profile_conf": args.profile_conf,
                   "match_instances": args.match_instances}
            print(f"timing {s}x{s} on {t} thread(s): {len(models)} models x {args.runs} images ...", flush=True)
            r = spawn(cfg)
            peak = max(r["gemm_before"]["gflops"], r["gemm_after"]["gflops"])
            summ = []
            for m in models:
                rows = r["per_image"][m["name"]]
                if m["kind"] == "mobileinst":  # per input shape (native graphs vary)
                    g = statistics.mean(mobileinst_gflops(m["weights"], tuple(x["input"]), flop_cache) for x in rows)
                else:
                    g = m["gflops"]
                sm = summarize(m["name"], rows, g, peak)
                sm.update(label=m["label"], kind=m["kind"], conf=r["conf"][m["name"]],
                          input_mean_hw=[statistics.mean(x["input"][0] for x in rows),
                                         statistics.mean(x["input"][1] for x in rows)])
                summ.append(sm)
                lines.append(fmt_row(sm, m["label"], t))
                print(lines[-1], flush=True)
            for a in (x for x in summ if x["kind"] == "mobileinst"):
                for b in (x for x in summ if x["kind"] == "yolo"):
                    ratios.append({"imgsz": s, "threads": t, "mobileinst": a["model"], "input": a["label"],
                                   "yolo": b["model"], "e2e_ratio": a["median_ms"]["e2e"] / b["median_ms"]["e2e"],
                                   "net_ratio": a["median_ms"]["net"] / b["median_ms"]["net"]})
            results.append({"imgsz": s, "threads": t, "summary": summ, "worker": r})
            print(f"  ORT {args.gemm}^3 MatMul {t}T: {r['gemm_before']['gflops']:.0f} / "
                  f"{r['gemm_after']['gflops']:.0f} GFLOP/s (before / after); load "
                  f"{r['loadavg_start']} -> {r['loadavg_end']}; session threads {r['session_threads']}", flush=True)

    conf_note = (f"conf per model for ~{args.match_instances:g} instances per warm-up image"
                 if args.match_instances else f"conf {args.conf} for every model")
    print(f"\nEnd to end per image (RGB uint8 in memory -> instances with masks at the original size), "
          f"{conf_note}, batch 1, median of {args.runs} val images of {args.data} after "
          f"{args.warmup} warm-up, models interleaved per image in one process per (input, threads); "
          f"YOLO pre/net/post = its Results.speed, e2e = wall clock of predict(retina_masks=True); "
          f"% peak = network GFLOP/s over onnxruntime's {args.gemm}^3 fp32 MatMul at the same threads.\n")
    table = "\n".join(lines)
    print(table)
    if ratios:
        print("\n| MobileInst | input | YOLO | thr | e2e MobileInst / YOLO | net MobileInst / YOLO |"
              "\n|---|---|---|---|---|---|")
        for q in ratios:
            print(f"| {q['mobileinst']} | {q['input']} | {q['yolo']} | {q['threads']} | "
                  f"{q['e2e_ratio']:.2f}x | {q['net_ratio']:.2f}x |")
    info["loadavg_end"] = loadavg()
    info["utc_end"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    settings["imgsz"] = sizes
    (out / "e2e_latency.json").write_text(json.dumps(
        {"machine": info, "settings": settings, "results": results, "ratios": ratios, "table": table},
        indent=1))
    for r in results:
        if "profile_post" in r["worker"]:
            print_profile(r["worker"]["profile_post"])
    print(f"\nwritten: {out / 'e2e_latency.json'}")


def print_profile(prof: dict) -> None:
    print("\n| MobileInst decode | input | conf | images | inst/img | package ms | plain recipe ms | min mask IoU |"
          "\n|---|---|---|---|---|---|---|---|")
    for name, p in prof.items():
        m, iou = p["median_ms"], p["min_mask_iou"]
        print(f"| {name} | {p['input']} | {p['conf']} | {p['images']} | {p['instances_mean']:.1f} | "
              f"{m.get('package', float('nan')):.2f} | {m.get('plain recipe', float('nan')):.2f} | "
              f"{'-' if iou is None else f'{iou:.4f}'} |")


if __name__ == "__main__":
    main()
